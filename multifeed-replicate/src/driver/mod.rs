//! The async driver: it carries the inputs of one [`Connection`] in and its outputs out,
//! against `hypercore-protocol`, the hypercores and the host, and sleeps until the next input
//! or the core's next deadline. Every decision is the core's (`crate::proto`).

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::Instant;

use futures::channel::mpsc;
use futures::select_biased;
use futures::stream::{BoxStream, SelectAll, StreamExt};
use futures::FutureExt;
use hypercore_protocol::{discovery_key, Channel, CommandTx, Event, Message, Protocol};
use multifeed_storage::SharedCore;

use crate::adapter;
use crate::backlog::Backlog;
use crate::close::CloseSignal;
use crate::proto::{Connection, DiscoveryKey, Output, MAX_OUTBOX, MAX_OUTBOX_WEIGHT};
use crate::transport::{weight_of_message, FrameLimits, Guard};
use crate::{FeedHost, ReplicateConfig, ReplicateError, ReplicateSummary, ReplicationEvent};

mod close;
mod outputs;
mod pump;

/// Runs one replication over an encrypted connection until it finishes, stops or fails.
///
/// Two futures share the task: the driver and the pump (see [`pump`]).
pub(crate) async fn run(
    cipher: Box<dyn hypercore_handshake::CipherTrait>,
    close: Option<CloseSignal>,
    host: Arc<dyn FeedHost>,
    mut config: ReplicateConfig,
) -> Result<ReplicateSummary, ReplicateError> {
    let backlog = Arc::new(Backlog::default());
    let limits = FrameLimits {
        max_channels: config.max_channels,
    };
    let protocol = Protocol::new(Box::new(Guard::new(cipher, limits, backlog.clone())));
    let commands = protocol.commands();
    let (events_tx, events_rx) = mpsc::unbounded::<io::Result<Event>>();
    let pump = pump::pump(protocol, events_tx, backlog.clone());
    let span = tracing::info_span!(
        "replication",
        initiator = config.initiator,
        live = config.live,
        mode = if config.plain_feeds.is_some() {
            "hypercore"
        } else {
            "multifeed"
        },
        peer = tracing::field::Empty,
    );
    let events = config.events.take();
    let stop = config.stop.clone();
    let live = config.live;
    let subscribe = config.live && config.plain_feeds.is_none();
    let driver = Driver {
        root_dk: discovery_key(&config.encryption_key),
        conn: Connection::new(config, Instant::now()),
        host,
        commands,
        close,
        events,
        unsent_progress: None,
        live,
        channels: HashMap::new(),
        cores: HashMap::new(),
        inbound: SelectAll::new(),
        changes: SelectAll::new(),
        watching: HashMap::new(),
        released: false,
        backlog,
        timer: async_io::Timer::never(),
        timer_at: None,
        outbox: Vec::new(),
        outbox_len: 0,
        outbox_weight: 0,
    };
    // Both live on the heap: the driver's state machine is large.
    let logic = Box::pin(tracing::Instrument::instrument(
        driver.run(events_rx, stop, subscribe),
        span.clone(),
    ));
    let result = match futures::future::select(logic, Box::pin(pump)).await {
        futures::future::Either::Left((result, _)) => result,
        futures::future::Either::Right((err, _)) => Err(err),
    };
    let _entered = span.enter();
    match &result {
        Ok(summary) => tracing::info!(
            blocks_received = summary.blocks_received,
            blocks_sent = summary.blocks_sent,
            feeds_received = summary.feeds_received,
            "replication done"
        ),
        // The application reports the error; this is the trace of where it happened.
        Err(err) => tracing::info!(code = err.code(), error = %err, "replication failed"),
    }
    result
}

/// What one item from the protocol's event queue means for the run.
enum Step {
    Continue,
    /// The run ends with this.
    End(Result<ReplicateSummary, ReplicateError>),
}

struct Driver {
    conn: Connection,
    host: Arc<dyn FeedHost>,
    commands: CommandTx,
    close: Option<CloseSignal>,
    events: Option<mpsc::Sender<ReplicationEvent>>,
    /// The latest progress event, when the application's queue was full.
    unsent_progress: Option<ReplicationEvent>,
    live: bool,
    root_dk: DiscoveryKey,
    /// Our open channels (the root too), by discovery key.
    channels: HashMap<DiscoveryKey, Channel>,
    /// The hypercore of every feed the core tracks (a probe until it is promoted).
    cores: HashMap<DiscoveryKey, SharedCore>,
    /// Each channel's incoming messages, all those already there at once: handling one feed's
    /// run together keeps its files, lock and answers together (polling channels in turn for
    /// one message each interleaved every feed's blocks).
    inbound: SelectAll<BoxStream<'static, (DiscoveryKey, Vec<Message>)>>,
    changes: SelectAll<BoxStream<'static, DiscoveryKey>>,
    /// Live: ends the change stream of each tracked core when the core lets it go (so the
    /// stream's handle on the core goes too).
    watching: HashMap<DiscoveryKey, futures::channel::oneshot::Sender<()>>,
    /// Live cores were let go since the host last heard of it.
    released: bool,
    backlog: Arc<Backlog>,
    /// Wakes the driver at the core's next deadline (set for `timer_at`).
    timer: async_io::Timer,
    timer_at: Option<Instant>,
    /// Messages queued for the peer, in order; consecutive ones for one channel share a batch.
    outbox: Vec<(DiscoveryKey, Vec<Message>)>,
    outbox_len: usize,
    outbox_weight: u64,
}

impl Driver {
    async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<io::Result<Event>>,
        stop: crate::StopHandle,
        subscribe: bool,
    ) -> Result<ReplicateSummary, ReplicateError> {
        let mut new_feeds = if subscribe {
            self.host.subscribe_new_feeds().fuse()
        } else {
            futures::stream::pending().boxed().fuse()
        };
        // Live: news of feeds whose channels closed idle comes from the host.
        let mut host_changes = if subscribe {
            self.host.subscribe_changes().fuse()
        } else {
            futures::stream::pending().boxed().fuse()
        };
        let stopped = futures::FutureExt::fuse(stop.stopped());
        futures::pin_mut!(stopped);
        let backlog = self.backlog.clone();
        loop {
            self.retry_progress();
            if let Some(progress) = self.conn.poll_progress() {
                self.emit(progress);
            }
            if self.conn.is_done() {
                break;
            }
            // Handle every message that is already here before writing: the answers and new
            // requests then leave together, in one frame per run of a channel's messages.
            if self.outbox_len >= MAX_OUTBOX || self.outbox_weight >= MAX_OUTBOX_WEIGHT {
                self.flush_outbox().await?;
                continue;
            }
            if let Some(Some((dk, messages))) = self.inbound.next().now_or_never() {
                self.on_messages(dk, messages).await?;
                continue;
            }
            if let Some(item) = events.next().now_or_never() {
                match Box::pin(self.on_protocol_item(item, &mut events)).await {
                    Step::Continue => continue,
                    Step::End(result) => return result,
                }
            }
            // Every message the protocol decoded was taken: it may read more. (Only here, and
            // always before waiting: a reader held back while the driver waits would stall
            // both.)
            self.backlog.input_taken();
            let waiting = self.conn.is_waiting_for_transport();
            self.conn.handle_transport_backlog(self.backlog.outgoing());
            if self.conn.can_drain() {
                self.conn.handle_drained(self.backlog.outgoing());
                self.drain().await?;
                continue;
            }
            self.flush_outbox().await?;
            if std::mem::take(&mut self.released) {
                self.host.cores_released();
            }
            let drained = async {
                if !waiting {
                    futures::future::pending::<()>().await;
                }
                backlog.outgoing_drained().await;
            };
            // Deadlines mostly move later (each bit of progress moves the idle one): the timer
            // is set again only when one comes earlier than it is set for, and when it fires
            // early the core finds nothing expired and the next wait sets it again.
            if let Some(deadline) = self.conn.poll_timeout() {
                if self.timer_at.is_none_or(|at| deadline < at) {
                    self.timer.set_at(deadline);
                    self.timer_at = Some(deadline);
                }
            }
            select_biased! {
                (dk, messages) = self.inbound.select_next_some() => {
                    self.on_messages(dk, messages).await?;
                }
                // On the heap: handling an event is the deepest, largest part of the run, and
                // debug builds overflowed a 2 MiB test thread's stack with it inline.
                item = events.next() => match Box::pin(self.on_protocol_item(item, &mut events)).await {
                    Step::Continue => {}
                    Step::End(result) => return result,
                },
                dk = self.changes.select_next_some() => self.on_local_change(dk).await?,
                change = host_changes.select_next_some() => {
                    self.conn.handle_host_change(change);
                    self.drain().await?;
                    self.conn.check_synced(Instant::now())?;
                    self.drain().await?;
                }
                key = new_feeds.select_next_some() => {
                    self.conn.handle_new_local_feed(key);
                    self.drain().await?;
                    self.conn.check_synced(Instant::now())?;
                }
                () = stopped => self.conn.handle_stop(),
                () = drained.fuse() => {
                    self.conn.handle_drained(self.backlog.outgoing());
                    self.drain().await?;
                }
                _ = futures::future::poll_fn(|cx| {
                    std::future::Future::poll(std::pin::Pin::new(&mut self.timer), cx)
                }).fuse() => {
                    self.timer_at = None;
                    self.conn.handle_timeout(Instant::now())?;
                    self.drain().await?;
                }
            }
        }
        self.conn.handle_end();
        self.drain().await?;
        if let Some(progress) = self.conn.poll_progress() {
            self.emit(progress);
        }
        self.flush_outbox().await?;
        self.close_gracefully(&mut events, true, false).await;
        Ok(*self.conn.summary())
    }

    /// Handles one item of the protocol's event queue (`None`: the queue ended).
    async fn on_protocol_item(
        &mut self,
        item: Option<io::Result<Event>>,
        events: &mut mpsc::UnboundedReceiver<io::Result<Event>>,
    ) -> Step {
        let noise_done = self.backlog.is_noise_done();
        match item {
            Some(Ok(event)) => match self.on_event(event).await {
                Ok(()) => Step::Continue,
                Err(err) => {
                    // Let the peer see our channel opens before we go, so it can tell why
                    // (a key mismatch shows on both sides).
                    let mismatch = matches!(err, ReplicateError::KeyMismatch);
                    self.close_gracefully(events, false, mismatch).await;
                    Step::End(Err(err))
                }
            },
            Some(Err(err)) => Step::End(self.conn.handle_connection_end(err, noise_done)),
            None => Step::End(
                self.conn
                    .handle_connection_end(io::ErrorKind::UnexpectedEof.into(), noise_done),
            ),
        }
    }

    async fn on_event(&mut self, event: Event) -> Result<(), ReplicateError> {
        let now = Instant::now();
        match event {
            Event::Handshake(remote_key) => {
                let peer = hex::encode(&remote_key[..8]);
                tracing::Span::current().record("peer", peer.as_str());
                tracing::info!("connected");
                self.conn.handle_handshake(now, remote_key)?
            }
            Event::DiscoveryKey(dk) => self.conn.handle_discovery_key(now, dk)?,
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
                self.channels.insert(dk, channel);
                match self.cores.get(&dk).cloned() {
                    Some(core) => {
                        let core = core.lock().await;
                        self.conn.handle_channel(now, dk, Some(&*core))?;
                    }
                    None => self.conn.handle_channel(now, dk, None)?,
                }
            }
            Event::Close(dk) => {
                self.conn.handle_channel_closed(now, dk)?;
                if dk != self.root_dk {
                    self.channels.remove(&dk);
                }
            }
            _ => return Ok(()),
        }
        self.drain().await?;
        self.conn.check_synced(now)?;
        self.drain().await
    }

    /// Hands a channel's messages to the core in order, carrying out what each asks for.
    async fn on_messages(
        &mut self,
        dk: DiscoveryKey,
        messages: Vec<Message>,
    ) -> Result<(), ReplicateError> {
        let now = Instant::now();
        let mut messages = messages.into_iter().peekable();
        while let Some(message) = messages.next() {
            if self.conn.is_done() {
                break;
            }
            let core = match &message {
                Message::Request(_) | Message::Extension(_) => None,
                _ => self.cores.get(&dk).cloned(),
            };
            let Some(core) = core else {
                self.conn.handle_message(now, dk, message, None)?;
                self.drain().await?;
                continue;
            };
            // The feed's messages in a row are handled under one lock, and so are the outputs
            // that only concern this feed (its answers applied, its requests); at the first
            // other output the lock is let go and the rest are carried out in order.
            let mut locked = core.lock().await;
            let mut next = Some(message);
            let mut rest = None;
            while let Some(message) = next.take() {
                self.conn.handle_message(now, dk, message, Some(&*locked))?;
                while let Some(output) = self.conn.poll_output() {
                    match output {
                        Output::Apply { applying, proof } if applying.dk == dk => {
                            let applied = adapter::apply_proof(&mut locked, &proof).await;
                            self.conn
                                .handle_applied(now, applying, proof, applied, &*locked)?;
                        }
                        Output::Request {
                            dk: to,
                            id,
                            fork,
                            block: Some((index, None)),
                            upgrade,
                        } if to == dk => {
                            let nodes = adapter::missing_nodes_locked(&mut locked, index).await?;
                            let block = Some((index, Some(nodes)));
                            self.queue_request(dk, id, fork, block, upgrade);
                        }
                        Output::Request {
                            dk,
                            id,
                            fork,
                            block: block @ (None | Some((_, Some(_)))),
                            upgrade,
                        } => self.queue_request(dk, id, fork, block, upgrade),
                        Output::Send { dk, messages } => self.queue(dk, messages),
                        Output::Event(event) => self.emit(event),
                        Output::NotifyChanged(changed) if changed == dk => core.notify_changed(),
                        other => {
                            rest = Some(other);
                            break;
                        }
                    }
                }
                if rest.is_some() || self.conn.is_done() {
                    break;
                }
                next =
                    messages.next_if(|m| !matches!(m, Message::Request(_) | Message::Extension(_)));
            }
            drop(locked);
            if let Some(output) = rest {
                self.carry_out(output).await?;
            }
            self.drain().await?;
        }
        self.conn.check_synced(now)?;
        self.drain().await
    }

    /// Our copy of a feed changed (append, or blocks from another connection).
    async fn on_local_change(&mut self, dk: DiscoveryKey) -> Result<(), ReplicateError> {
        self.conn.handle_transport_backlog(self.backlog.outgoing());
        if let Some(core) = self.cores.get(&dk).cloned() {
            let core = core.lock().await;
            self.conn.handle_local_change(dk, &*core);
        }
        self.drain().await?;
        self.conn.check_synced(Instant::now())?;
        self.drain().await
    }

    fn emit(&mut self, event: ReplicationEvent) {
        trace_event(&event);
        let Some(sender) = &mut self.events else {
            return;
        };
        let progress = matches!(event, ReplicationEvent::Progress { .. });
        match sender.try_send(event) {
            Ok(()) if progress => self.unsent_progress = None,
            Ok(()) => {}
            // The application is behind: the latest progress goes out when it catches up.
            Err(err) if progress => self.unsent_progress = Some(err.into_inner()),
            Err(_) => {}
        }
    }

    fn retry_progress(&mut self) {
        if let (Some(event), Some(sender)) = (self.unsent_progress.take(), &mut self.events) {
            if let Err(err) = sender.try_send(event) {
                self.unsent_progress = Some(err.into_inner());
            }
        }
    }

    /// Queues a request whose node count is known.
    fn queue_request(
        &mut self,
        dk: DiscoveryKey,
        id: u64,
        fork: u64,
        block: Option<(u64, Option<u64>)>,
        upgrade: Option<hypercore_schema::RequestUpgrade>,
    ) {
        let block = block.map(|(index, nodes)| (index, nodes.unwrap_or(0)));
        let request = crate::proto::request(id, fork, block, upgrade);
        self.queue(dk, vec![Message::Request(request)]);
    }

    /// Queues messages for the peer; [`flush_outbox`](Self::flush_outbox) sends them.
    fn queue(&mut self, dk: DiscoveryKey, messages: Vec<Message>) {
        if messages.is_empty() || self.channels.get(&dk).is_none_or(Channel::closed) {
            return;
        }
        self.outbox_len += messages.len();
        self.outbox_weight += messages.iter().map(weight_of_message).sum::<u64>();
        match self.outbox.last_mut() {
            Some((last, queued)) if *last == dk => queued.extend(messages),
            _ => self.outbox.push((dk, messages)),
        }
    }

    /// Hands every queued message to the protocol, in order: one batch (one frame) per run of
    /// messages for the same channel. The protocol's queue holds what it was handed until the
    /// transport takes it: the weight is counted in the [`Backlog`] once handed over.
    async fn flush_outbox(&mut self) -> Result<(), ReplicateError> {
        self.outbox_len = 0;
        self.outbox_weight = 0;
        for (dk, messages) in std::mem::take(&mut self.outbox) {
            let Some(channel) = self.channels.get(&dk).filter(|c| !c.closed()) else {
                continue;
            };
            let weight = messages.iter().map(weight_of_message).sum::<u64>();
            channel
                .send_batch(&messages)
                .await
                .map_err(|e| ReplicateError::io(crate::Phase::Replication, e))?;
            self.backlog.add_outgoing(weight);
        }
        self.conn.handle_written(self.backlog.outgoing());
        Ok(())
    }
}

/// Logs what the application is told (nothing per block above `trace`).
fn trace_event(event: &ReplicationEvent) {
    match event {
        ReplicationEvent::RemoteHandshake { .. } => tracing::info!("exchange handshake accepted"),
        ReplicationEvent::RemoteFeeds(keys) => tracing::debug!(feeds = keys.len(), "feeds agreed"),
        ReplicationEvent::FeedAdded(key) => {
            tracing::debug!(feed = %hex::encode(&key[..8]), "feed added")
        }
        ReplicationEvent::FeedUnavailable { key, reason } => {
            tracing::warn!(feed = %hex::encode(&key[..8]), reason = %reason, "feed unavailable")
        }
        ReplicationEvent::Downloaded { key, range, blocks } => tracing::debug!(
            feed = %hex::encode(&key[..8]),
            start = range.start,
            end = range.end,
            blocks,
            "downloaded"
        ),
        ReplicationEvent::Synced => tracing::info!("in sync"),
        ReplicationEvent::Progress {
            blocks_done,
            blocks_known,
        } => tracing::trace!(blocks_done, blocks_known, "progress"),
    }
}

impl Driver {
    /// Live: reports the core's changes to the connection until the core lets the feed go.
    fn watch(&mut self, dk: DiscoveryKey, core: &SharedCore) {
        let (stop, stopped) = futures::channel::oneshot::channel::<()>();
        self.watching.insert(dk, stop);
        self.changes
            .push(change_stream(dk, core).take_until(stopped).boxed());
    }
}

/// Yields `dk` whenever the core reports a change (without keeping the core open: the driver
/// lets a core go by dropping its handle, and the host may then close it).
fn change_stream(dk: DiscoveryKey, core: &SharedCore) -> BoxStream<'static, DiscoveryKey> {
    let seen = core.version();
    futures::stream::unfold((core.watch(), seen), move |(watch, seen)| async move {
        let now = watch.changed(seen).await?;
        Some((dk, (watch, now)))
    })
    .boxed()
}
