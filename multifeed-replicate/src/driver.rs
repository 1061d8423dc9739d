//! The connection driver: one task polls the protocol and routes messages to the meta exchange
//! and to each feed's sync state.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::channel::mpsc;
use futures::select_biased;
use futures::stream::{BoxStream, SelectAll, StreamExt};
use futures::FutureExt;
use hypercore_protocol::schema::{Data, NoData, Range, Request, Synchronize};
use hypercore_protocol::{discovery_key, Channel, CommandTx, Event, Message, Protocol};
use hypercore_schema::{RequestBlock, RequestUpgrade};
use multifeed_meta::{Action, Exchange, ExchangeConfig, FeedOffer};
use multifeed_storage::{FeedKey, SharedCore};

use crate::backlog::{Backlog, OUTGOING_HIGH};
use crate::close::CloseSignal;
use crate::error::PeerViolation;
use crate::sync::{Asked, SyncState};
use crate::transport::{weight_of_message, FrameLimits, Guard};
use crate::{FeedHost, ReplicateConfig, ReplicateError, ReplicateSummary, ReplicationEvent};

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
/// How long the driver may stay stuck after the connection failed before the failure is
/// returned anyway.
const END_GRACE: Duration = Duration::from_secs(2);
const LINGER: Duration = Duration::from_secs(5);
const BARRIER: &str = "multifeed-close-barrier";

type DiscoveryKey = [u8; 32];

/// Runs one replication over an encrypted connection until it finishes, stops or fails.
///
/// Three futures share the task: the driver, the pump (which always polls the protocol, so no
/// send of the driver can deadlock, and contains a panic of it), and a watchdog that ends the
/// replication when a timeout passes, whatever the driver is waiting for.
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
    let mut protocol = Protocol::new(Box::new(Guard::new(cipher, limits, backlog.clone())));
    let commands = protocol.commands();
    let (events_tx, events_rx) = mpsc::unbounded::<io::Result<Event>>();
    let pump_backlog = backlog.clone();
    let pump = async move {
        loop {
            let next = AssertUnwindSafe(protocol.next()).catch_unwind().await;
            let err = match next {
                Ok(Some(Ok(event))) => {
                    if events_tx.unbounded_send(Ok(event)).is_err() {
                        futures::future::pending::<()>().await;
                    }
                    continue;
                }
                Ok(Some(Err(err))) => err,
                Ok(None) => io::ErrorKind::UnexpectedEof.into(),
                Err(_panic) => PeerViolation::ProtocolPanic.into_io(),
            };
            // The driver hears of the end first; if it is stuck in a wait that only the
            // protocol could end, the end is returned from here.
            let kind = err.kind();
            let text = err.to_string();
            let violation = PeerViolation::from_io(&err).cloned();
            let _ = events_tx.unbounded_send(Err(err));
            async_io::Timer::after(END_GRACE).await;
            let phase = if pump_backlog.is_noise_done() {
                "replication"
            } else {
                "noise handshake"
            };
            let source = match violation {
                Some(violation) => violation.into_io(),
                None => io::Error::new(kind, text),
            };
            return ReplicateError::io(phase, source);
        }
    };
    let watchdog = watch(backlog.clone(), Timeouts::of(&config));
    let driver = Driver::new(host, config, commands, close, backlog);
    // All live on the heap: the driver's state machine is large.
    let logic = Box::pin(driver.run(events_rx));
    let ended = Box::pin(futures::future::select(Box::pin(pump), Box::pin(watchdog)));
    match futures::future::select(logic, ended).await {
        futures::future::Either::Left((result, _)) => result,
        futures::future::Either::Right((either, _)) => Err(either.factor_first().0),
    }
}

/// The timeouts the watchdog enforces.
struct Timeouts {
    handshake: Duration,
    idle: Duration,
    live: bool,
    /// Live multifeed peers only: plain Hypercore peers send no keep-alive.
    keepalive: Option<Duration>,
}

impl Timeouts {
    fn of(config: &ReplicateConfig) -> Self {
        Self {
            handshake: config.handshake_timeout,
            idle: config.idle_timeout,
            live: config.live,
            keepalive: (config.live && config.plain_feeds.is_none()).then_some(config.live_timeout),
        }
    }
}

/// Resolves with the timeout that passed first: the handshakes, a non-live replication that
/// made no progress, or a live peer that sent nothing (not even a keep-alive).
async fn watch(backlog: Arc<Backlog>, timeouts: Timeouts) -> ReplicateError {
    let Timeouts {
        handshake: handshake_timeout,
        idle: idle_timeout,
        live,
        keepalive: live_timeout,
    } = timeouts;
    loop {
        async_io::Timer::after(TICK).await;
        if !backlog.is_exchange_done() {
            if backlog.age() > handshake_timeout {
                return ReplicateError::Timeout {
                    phase: if backlog.is_noise_done() {
                        "exchange handshake"
                    } else {
                        "noise handshake"
                    },
                };
            }
            continue;
        }
        if !live && backlog.since_progress() > idle_timeout {
            return ReplicateError::Timeout {
                phase: "replication",
            };
        }
        if let Some(timeout) = live_timeout {
            if backlog.since_received() > timeout {
                return ReplicateError::Timeout {
                    phase: "live keep-alive",
                };
            }
        }
    }
}

/// One feed replicating on this connection.
struct FeedState {
    key: FeedKey,
    core: SharedCore,
    channel: Option<Channel>,
    /// Whether we asked the protocol to open its channel.
    opened: bool,
    sync: SyncState,
    /// For feeds we download (non-live): the length to reach.
    target: Option<u64>,
    /// Set once an answer came out of order: node counts assume only our contiguous blocks.
    cautious: bool,
    /// Requests in flight whose node count assumed the block before arrives first.
    optimistic: HashSet<u64>,
    /// Answers in a row that brought no block and no length.
    fruitless: u32,
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
    handshake_done: bool,
    finished: bool,
    /// The peer closed the root channel.
    peer_closed_root: bool,
    backlog: Arc<Backlog>,
    /// The peer's requests waiting for the transport to drain (bounded).
    deferred: VecDeque<(DiscoveryKey, Request)>,
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
            handshake_done: false,
            finished: false,
            peer_closed_root: false,
            backlog,
            deferred: VecDeque::new(),
            unknown_channels: HashSet::new(),
            sent_since_tick: false,
            probes: 0,
            waiting: VecDeque::new(),
            feeds_added: 0,
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
        let keepalive_every = if self.config.live && self.exchange.is_some() {
            self.config.keepalive_interval
        } else {
            // Never fires: plain peers have no keep-alive, non-live replications end by
            // themselves or by the idle timeout.
            Duration::from_secs(365 * 24 * 3600)
        };
        let mut keepalive = StreamExt::fuse(async_io::Timer::interval(keepalive_every));
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
            if !self.deferred.is_empty() && !self.outgoing_full() {
                self.serve_deferred().await?;
                continue;
            }
            self.flush_outbox().await?;
            let waiting = !self.deferred.is_empty();
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
                item = events.next() => match self.on_protocol_item(item, &mut events).await {
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

    /// Whether what waits for the transport is above the high-water mark: requests then wait.
    fn outgoing_full(&self) -> bool {
        self.backlog.outgoing() + self.outbox_weight > OUTGOING_HIGH
    }

    /// Answers waiting requests while the transport keeps up.
    async fn serve_deferred(&mut self) -> Result<(), ReplicateError> {
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
            || (serving_only && self.handshake_done)
        {
            return Ok(self.summary);
        }
        let phase = if !self.handshake_done && !self.backlog.is_noise_done() {
            "noise handshake"
        } else if self.root.is_none() && self.exchange.is_some() {
            "root channel"
        } else {
            "replication"
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
            Event::Handshake(_) => {
                self.handshake_done = true;
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
                                    "replication",
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
                            "replication",
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
            .map_err(|e| ReplicateError::io("opening a channel", e))
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
                    self.emit(ReplicationEvent::RemoteHandshake { user_data });
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
                    if !downloads.is_empty() {
                        self.emit(ReplicationEvent::RemoteFeeds(downloads));
                    }
                }
                Action::Finished => self.finished = true,
                _ => {}
            }
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
                .map_err(|e| ReplicateError::io("replication", e))?;
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
            if target.is_some() {
                feed.target = target;
            }
        } else {
            let core = match self
                .host
                .open_feed(&key)
                .await
                .map_err(ReplicateError::Host)?
            {
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
                    sync: SyncState::new(self.config.max_in_flight),
                    target,
                    cautious: false,
                    optimistic: HashSet::new(),
                    fruitless: 0,
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
        let feed = self.feeds.get(dk)?;
        let info = feed.core.lock().await.info();
        Some(info)
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
    async fn announce(&mut self, dk: DiscoveryKey) -> Result<(), ReplicateError> {
        let Some(feed) = self.feeds.get(&dk) else {
            return Ok(());
        };
        let Some(channel) = feed.channel.clone() else {
            return Ok(());
        };
        let info = feed.core.lock().await.info();
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
                if feed.target.is_none() && self.exchange.is_none() && !self.config.live {
                    // Plain mode: download up to what the peer has.
                    feed.target = Some(sync.length);
                    let contiguous = feed.core.lock().await.info().contiguous_length;
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
                        "replication",
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
                    feed.optimistic.remove(&no_data.request);
                }
            }
            _ => {}
        }
        Ok(Next::Continue)
    }

    /// Asks the peer for the upgrade and the blocks we lack, keeping many requests in flight.
    async fn request_more(&mut self, dk: DiscoveryKey) -> Result<(), ReplicateError> {
        let Some(feed) = self.feeds.get_mut(&dk) else {
            return Ok(());
        };
        let Some(channel) = feed.channel.clone() else {
            return Ok(());
        };
        let mut messages = Vec::new();
        {
            let mut core = feed.core.lock().await;
            let info = core.info();
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
                // The block before, asked for earlier, is stored by the time this answer comes.
                let optimistic = !feed.cautious
                    && info.fork == 0
                    && index > info.contiguous_length
                    && feed.sync.block_in_flight(index - 1);
                let held_below = if optimistic {
                    feed.optimistic.insert(id);
                    index
                } else {
                    info.contiguous_length
                };
                let nodes =
                    match crate::sync::nodes_to_ask(index, info.fork, held_below, info.length) {
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
        }
        if messages.is_empty() {
            return Ok(());
        }
        // A new burst: the blocks of the previous one are a batch the host may make durable.
        self.blocks_stored().await?;
        self.queue(dk, &channel, messages);
        Ok(())
    }

    /// Lets the host make the blocks stored so far durable.
    async fn blocks_stored(&mut self) -> Result<(), ReplicateError> {
        if std::mem::take(&mut self.unsynced_blocks) {
            self.host
                .blocks_stored()
                .await
                .map_err(ReplicateError::Host)?;
        }
        Ok(())
    }

    /// Answers a request with a proof, or NoData.
    async fn serve(&mut self, dk: DiscoveryKey, request: Request) -> Result<(), ReplicateError> {
        let Some(feed) = self.feeds.get(&dk) else {
            return Ok(());
        };
        let Some(channel) = feed.channel.clone() else {
            return Ok(());
        };
        let proof = {
            let mut core = feed.core.lock().await;
            if crate::sync::servable(&request, core.info().length) {
                // Validation keeps hypercore 0.16 from panicking on hostile requests; a panic
                // it still finds is contained and answered like a request we cannot serve.
                AssertUnwindSafe(core.create_proof(
                    request.block,
                    request.hash,
                    request.seek,
                    request.upgrade,
                ))
                .catch_unwind()
                .await
                .unwrap_or(Ok(None))
            } else {
                Ok(None)
            }
        };
        let message = match proof {
            Ok(Some(proof)) => {
                self.backlog.on_progress();
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
            Ok(None) | Err(_) => Message::NoData(NoData {
                request: request.id,
            }),
        };
        self.queue(dk, &channel, vec![message]);
        Ok(())
    }

    /// Verifies and stores a proof from the peer; a proof that fails verification ends the
    /// connection. Data we never asked for is ignored, and so is an answer about another block
    /// than the one asked for; a feed whose answers bring nothing [`MAX_FRUITLESS_ANSWERS`]
    /// times in a row ends the connection ([`PeerViolation::NoProgress`]).
    async fn on_data(&mut self, dk: DiscoveryKey, data: Data) -> Result<(), ReplicateError> {
        let Some(feed) = self.feeds.get_mut(&dk) else {
            return Ok(());
        };
        let Some(asked) = feed.sync.on_data(data.request) else {
            return Ok(());
        };
        let optimistic = feed.optimistic.remove(&data.request);
        if !answers(asked, &data) {
            if let Asked::Block(index) | Asked::UpgradeAndBlock(index) = asked {
                feed.sync.retry_from(index);
            }
            self.fruitless(dk)?;
            return self.request_more(dk).await;
        }
        if !crate::sync::well_formed(&data) {
            return Err(ReplicateError::InvalidProof {
                key: hex::encode(feed.key),
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
            let before = core.info();
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
                    feed.cautious = true;
                    feed.sync.retry_from(index);
                    return self.request_more(dk).await;
                }
            }
            let had_block = asked_block.is_some_and(|index| core.has(index));
            let applied = AssertUnwindSafe(core.verify_and_apply_proof(&proof))
                .catch_unwind()
                .await;
            let held = asked_block.map(|index| core.has(index));
            (applied, before, core.info(), (had_block, held))
        };
        let (had_block, held) = stored;
        let stored = !had_block && held == Some(true);
        let applied = match applied {
            Ok(applied) => applied,
            Err(_) => {
                return Err(ReplicateError::InvalidProof {
                    key: hex::encode(feed.key),
                    reason: "hypercore panicked while verifying the proof".to_owned(),
                })
            }
        };
        // Not applied (another fork), or the block asked for is still missing: the answer
        // brought nothing. A block that arrived twice (from two peers) is not the peer's fault.
        let useless = match applied {
            Ok(applied) => !applied || held == Some(false),
            Err(_) => false,
        };
        match applied {
            Ok(_) => {}
            Err(hypercore::HypercoreError::IO { context, source }) => {
                return Err(ReplicateError::Hypercore {
                    key: hex::encode(feed.key),
                    source: hypercore::HypercoreError::IO { context, source },
                })
            }
            Err(err) => {
                return Err(ReplicateError::InvalidProof {
                    key: hex::encode(feed.key),
                    reason: err.to_string(),
                })
            }
        }
        let progressed = stored || info.length != before.length || info.fork != before.fork;
        if progressed {
            feed.fruitless = 0;
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
                self.summary.blocks_received += 1;
                self.summary.bytes_received += block_bytes.unwrap_or(0);
                self.progress_dirty = true;
            } else if !info_has(&info, index) {
                feed.sync.retry_from(index);
            }
        }
        if let Some(target) = feed.target {
            if info.contiguous_length >= target {
                self.incomplete.remove(&dk);
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

    /// A probe's first signed root verified: the host records the feed, the proof is applied
    /// to the host's core too, and the feed goes on syncing there. Returns false when this
    /// connection may add no more feeds (the probe is dropped).
    async fn promote(
        &mut self,
        dk: DiscoveryKey,
        proof: &hypercore_schema::Proof,
    ) -> Result<bool, ReplicateError> {
        self.probes = self.probes.saturating_sub(1);
        let Some(key) = self.feeds.get(&dk).map(|feed| feed.key) else {
            return Ok(false);
        };
        if self.feeds_added >= self.config.max_new_feeds {
            self.feeds.remove(&dk);
            self.incomplete.remove(&dk);
            self.start_waiting().await?;
            return Ok(false);
        }
        let core = self
            .host
            .add_remote_feed(&key)
            .await
            .map_err(ReplicateError::Host)?;
        self.feeds_added += 1;
        self.emit(ReplicationEvent::FeedAdded(key));
        {
            let mut real = core.lock().await;
            // Another connection may have added it meanwhile: then it has this root already.
            if real.info().length == 0 {
                let applied = AssertUnwindSafe(real.verify_and_apply_proof(proof))
                    .catch_unwind()
                    .await;
                match applied {
                    Ok(Ok(_)) => {}
                    Ok(Err(err)) => return Err(ReplicateError::hypercore(&key, err)),
                    Err(_) => {
                        return Err(ReplicateError::InvalidProof {
                            key: hex::encode(key),
                            reason: "hypercore panicked while verifying the proof".to_owned(),
                        })
                    }
                }
            }
        }
        core.notify_changed();
        if self.config.live {
            self.changes.push(change_stream(dk, core.clone()));
        }
        if let Some(feed) = self.feeds.get_mut(&dk) {
            feed.core = core;
            feed.probe = false;
        }
        self.start_waiting().await?;
        Ok(true)
    }

    /// Starts new feeds that waited for a probe slot.
    async fn start_waiting(&mut self) -> Result<(), ReplicateError> {
        while self.probes < MAX_PROBES {
            let Some((key, target)) = self.waiting.pop_front() else {
                break;
            };
            self.track_feed(key, target, true).await?;
            self.open_feed_channel(key).await?;
        }
        Ok(())
    }

    /// Counts an answer that brought nothing; too many in a row end the connection.
    fn fruitless(&mut self, dk: DiscoveryKey) -> Result<(), ReplicateError> {
        let Some(feed) = self.feeds.get_mut(&dk) else {
            return Ok(());
        };
        feed.fruitless += 1;
        if feed.fruitless > MAX_FRUITLESS_ANSWERS {
            return Err(ReplicateError::peer(
                "replication",
                PeerViolation::NoProgress {
                    key: hex::encode(feed.key),
                    answers: feed.fruitless,
                },
            ));
        }
        Ok(())
    }

    /// Our copy of a feed changed (append, or blocks from another connection): tell the peer.
    async fn on_local_change(&mut self, dk: DiscoveryKey) -> Result<Next, ReplicateError> {
        self.announce(dk).await?;
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
        let Some(core) = self
            .host
            .open_feed(&key)
            .await
            .map_err(ReplicateError::Host)?
        else {
            return Ok(Next::Continue);
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

    /// Non-live: once every wanted feed reached its target, report SYNCED.
    async fn check_synced(&mut self) -> Result<(), ReplicateError> {
        if self.config.live {
            return Ok(());
        }
        if self.exchange.is_none() {
            // Plain mode: done once every feed we fetch reached the peer's length.
            let plain = self.config.plain_feeds.as_deref().unwrap_or(&[]);
            let all_known = plain.iter().all(|key| {
                self.feeds
                    .get(&discovery_key(key))
                    .is_some_and(|feed| feed.target.is_some())
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

/// Whether a Data message answers what was asked: the block asked for (or none), the upgrade
/// when only an upgrade was asked for, and no upgrade we did not ask for.
fn answers(asked: Asked, data: &Data) -> bool {
    if asked_no_upgrade(asked) && data.upgrade.is_some() {
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

fn asked_no_upgrade(asked: Asked) -> bool {
    matches!(asked, Asked::Block(_))
}

/// Whether a block below the contiguous length (so certainly held) is `index`.
fn info_has(info: &hypercore::Info, index: u64) -> bool {
    index < info.contiguous_length
}

/// An in-memory hypercore for a feed we do not hold yet (4 KiB pages: a probe costs little).
async fn probe_core(key: &FeedKey) -> Result<SharedCore, ReplicateError> {
    use futures::FutureExt;
    use hypercore::{HypercoreBuilder, PartialKeypair, Storage, StorageTraits};
    let create = |_| {
        async {
            Ok(
                Box::new(random_access_memory::RandomAccessMemory::new(4096))
                    as Box<dyn StorageTraits + Send>,
            )
        }
        .boxed()
    };
    let storage = Storage::open(create, false)
        .await
        .map_err(|e| ReplicateError::hypercore(key, e))?;
    let public = hypercore::VerifyingKey::from_bytes(key).map_err(|_| {
        ReplicateError::hypercore(
            key,
            hypercore::HypercoreError::InvalidOperation {
                context: "not an ed25519 public key".to_owned(),
            },
        )
    })?;
    let core = HypercoreBuilder::new(storage)
        .key_pair(PartialKeypair {
            public,
            secret: None,
        })
        .build()
        .await
        .map_err(|e| ReplicateError::hypercore(key, e))?;
    Ok(SharedCore::new(core))
}

/// Whether `key` can be a feed's public key: a valid ed25519 point that is not of small order
/// (a signature under a small-order key proves nothing).
pub(crate) fn usable_feed_key(key: &FeedKey) -> bool {
    hypercore::VerifyingKey::from_bytes(key).is_ok_and(|key| !key.is_weak())
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

/// Yields `dk` whenever the core reports a change.
fn change_stream(dk: DiscoveryKey, core: SharedCore) -> BoxStream<'static, DiscoveryKey> {
    let seen = core.version();
    futures::stream::unfold((core, seen), move |(core, seen)| async move {
        let now = core.changed(seen).await;
        Some((dk, (core, now)))
    })
    .boxed()
}
