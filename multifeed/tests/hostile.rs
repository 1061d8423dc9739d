//! Hostile peers that know the key: they complete the multifeed handshake and then stall, vanish,
//! lie about forks or chatter without progress. Every replication still ends, in bounded time,
//! with a typed error.

use std::time::Duration;

use hypercore_protocol::schema::{Data, Extension, Synchronize};
use hypercore_protocol::Message;
use hypercore_schema::DataUpgrade;
use multifeed::{Error, Multifeed, ReplicateOptions, ReplicateSummary, DEFAULT_ENCRYPTION_KEY};
use multifeed_meta::{Action, Exchange, ExchangeConfig, FeedOffer};
use multifeed_replicate::hostile::{batch_frame, message_frame, meta_frame, HostilePeer};
use multifeed_replicate::{PeerViolation, ReplicateError};

type Socket = async_std::os::unix::net::UnixStream;

/// Channel id of the root channel on the hostile side.
const ROOT: u64 = 1;
/// Channel id of the one feed channel the hostile side opens.
const FEED: u64 = 2;

async fn within<T>(what: &str, bound: Duration, fut: impl std::future::Future<Output = T>) -> T {
    async_std::future::timeout(bound, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {bound:?} waiting for {what}"))
}

/// A hostile peer that speaks the multifeed exchange (with our own sans-IO state machine) over
/// raw frames, and does exactly what each test tells it beyond that.
struct Session {
    peer: HostilePeer,
    exchange: Exchange,
    /// Offers the honest side made.
    offered: Vec<FeedOffer>,
    /// Keys the exchange agreed to replicate.
    agreed: Vec<[u8; 32]>,
    /// The honest side sent SYNCED.
    remote_synced: bool,
}

impl Session {
    /// Noise handshake, root channel, and our HANDSHAKE and MANIFEST (offering `offers`).
    async fn start(socket: Socket, live: bool, offers: Vec<FeedOffer>) -> Self {
        let mut peer = HostilePeer::handshake(socket, true).await.expect("noise");
        let open = peer
            .open_frame(ROOT, &DEFAULT_ENCRYPTION_KEY)
            .expect("open");
        peer.send_frame(open).await.expect("sent");
        peer.wait_open(&DEFAULT_ENCRYPTION_KEY)
            .await
            .expect("root opened");
        let mut session = Self {
            peer,
            // The Noise initiator drives the reconciliation too.
            exchange: Exchange::new(ExchangeConfig {
                live,
                initiator: true,
                ..ExchangeConfig::default()
            }),
            offered: Vec::new(),
            agreed: Vec::new(),
            remote_synced: false,
        };
        let mut actions = session.exchange.start();
        actions.extend(session.exchange.offer(offers));
        session.apply(actions).await;
        session
    }

    async fn apply(&mut self, actions: Vec<Action>) {
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Send(message) => {
                    let frame = meta_frame(ROOT, &message).expect("frame");
                    self.peer.send_frame(frame).await.expect("sent");
                }
                Action::RemoteOffered(offers) => self.offered.extend(offers),
                Action::Replicate(keys) => self.agreed.extend(keys),
                _ => {}
            }
        }
    }

    /// Opens our side of the channel of `key` (once the honest side opened its) and announces
    /// `length` blocks.
    async fn open_feed_channel(&mut self, key: &[u8; 32], length: u64) {
        self.peer.wait_open(key).await.expect("feed opened");
        let open = self.peer.open_frame(FEED, key).expect("open");
        self.peer.send_frame(open).await.expect("sent");
        let sync = Message::Synchronize(Synchronize {
            fork: 0,
            length,
            remote_length: 0,
            downloading: true,
            uploading: true,
            can_upgrade: true,
        });
        let frame = message_frame(FEED, &sync).expect("frame");
        self.peer.send_frame(frame).await.expect("sent");
    }

    /// Reads the honest side's messages, running the exchange, until `done` says so; returns the
    /// feed-channel messages seen on the way.
    /// A non-live session that offers one feed, `key` at `length`, and waits until the honest
    /// side agreed to replicate it.
    async fn agreed_on(socket: Socket, key: [u8; 32], length: u64) -> Self {
        let mut session = Self::start(socket, false, vec![FeedOffer { key, length }]).await;
        session.until(|s| s.agreed.contains(&key)).await;
        session
    }

    async fn until(&mut self, mut done: impl FnMut(&Self) -> bool) -> Vec<Message> {
        let mut others = Vec::new();
        while !done(self) {
            let messages = self.peer.next_messages().await.expect("a frame");
            for (_, message) in messages {
                match message {
                    Message::Extension(Extension { name, message }) if name == "multifeed" => {
                        if let Ok(multifeed_meta::Message::Synced) =
                            multifeed_meta::Message::decode(&message)
                        {
                            self.remote_synced = true;
                        }
                        let actions = self.exchange.handle(&message).expect("a valid message");
                        self.apply(actions).await;
                    }
                    other => others.push(other),
                }
            }
        }
        others
    }
}

async fn writer_store(feeds: usize) -> Multifeed {
    let multi = Multifeed::open_memory().await.expect("memory store");
    for i in 0..feeds {
        let writer = multi.writer(&format!("w{i}")).await.expect("writer");
        writer.append(b"entry").await.expect("append");
    }
    multi
}

/// Runs the honest side's replication against `attack`.
async fn against<F, Fut>(
    honest: &Multifeed,
    options: ReplicateOptions,
    bound: Duration,
    attack: F,
) -> Result<ReplicateSummary, Error>
where
    F: FnOnce(Socket) -> Fut,
    Fut: std::future::Future<Output = Option<Session>>,
{
    let (ours, theirs) = Socket::pair().expect("socket pair");
    let (result, _session) = within(
        "the honest side to end",
        bound,
        // On the heap: debug builds of these futures are large.
        futures::future::join(
            Box::pin(honest.replicate(ours, options)),
            Box::pin(attack(theirs)),
        ),
    )
    .await;
    result
}

fn replicate_error(result: Result<ReplicateSummary, Error>) -> ReplicateError {
    match result {
        Err(Error::Replicate(err)) => err,
        other => panic!("expected a replication error, got {other:?}"),
    }
}

#[async_std::test]
async fn a_peer_that_requests_thousands_of_feeds_and_vanishes_does_not_hang_us() {
    // Was: with 3,000-10,000 feeds the serving side hung for more than 120 s (the driver blocked
    // on the protocol's full command queue after the protocol stopped).
    let honest = writer_store(3_000).await;
    let result = against(
        &honest,
        ReplicateOptions::new(false),
        Duration::from_secs(30),
        |socket| async move {
            let mut session = Session::start(socket, false, Vec::new()).await;
            session.until(|s| s.offered.len() == 3_000).await;
            let keys = session.offered.iter().map(|offer| offer.key).collect();
            let actions = session.exchange.request(keys);
            session.apply(actions).await;
            // Gone, without a word.
            drop(session);
            None
        },
    )
    .await;
    let err = replicate_error(result);
    assert_eq!(err.code(), "ERR_CONNECTION", "{err}");
}

#[async_std::test]
async fn answers_for_another_fork_end_the_sync_instead_of_a_livelock() {
    // Was: hypercore returns Ok(false) for a proof of another fork and the driver asked again,
    // 13,700 round trips a second for as long as the peer liked.
    let honest = Multifeed::open_memory().await.expect("memory store");
    let key = hypercore::generate_signing_key().verifying_key().to_bytes();
    let result = against(
        &honest,
        ReplicateOptions::new(false),
        Duration::from_secs(30),
        |socket| async move {
            let mut session = Session::agreed_on(socket, key, 5).await;
            session.open_feed_channel(&key, 5).await;
            let mut answered = 0u32;
            while answered < 1_000 {
                let Ok(messages) = session.peer.next_messages().await else {
                    break;
                };
                for (_, message) in messages {
                    if let Message::Request(request) = message {
                        let data = Message::Data(Data {
                            request: request.id,
                            fork: 1,
                            block: None,
                            hash: None,
                            seek: None,
                            upgrade: Some(DataUpgrade {
                                start: 0,
                                length: 5,
                                nodes: Vec::new(),
                                additional_nodes: Vec::new(),
                                signature: vec![0; 64],
                            }),
                        });
                        let frame = message_frame(FEED, &data).expect("frame");
                        if session.peer.send_frame(frame).await.is_err() {
                            break;
                        }
                        answered += 1;
                    }
                }
            }
            assert!(answered < 1_000, "the honest side kept asking");
            Some(session)
        },
    )
    .await;
    let err = replicate_error(result);
    assert!(
        matches!(
            err,
            ReplicateError::Peer {
                violation: PeerViolation::NoProgress { .. },
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.code(), "ERR_NO_PROGRESS");
}

#[async_std::test]
async fn chatter_without_progress_does_not_keep_a_sync_alive() {
    // Was: an empty extension every 2 s kept a non-live replication of a never-served feed
    // alive forever.
    let honest = Multifeed::open_memory().await.expect("memory store");
    let key = hypercore::generate_signing_key().verifying_key().to_bytes();
    let options =
        ReplicateOptions::new(false).timeouts(Duration::from_secs(10), Duration::from_millis(600));
    let result = against(
        &honest,
        options,
        Duration::from_secs(20),
        |socket| async move {
            let mut session = Session::agreed_on(socket, key, 5).await;
            let chatter = Message::Extension(Extension {
                name: "chatter".to_owned(),
                message: Vec::new(),
            });
            for _ in 0..200 {
                let frame = message_frame(ROOT, &chatter).expect("frame");
                if session.peer.send_frame(frame).await.is_err() {
                    break;
                }
                async_std::task::sleep(Duration::from_millis(50)).await;
            }
            Some(session)
        },
    )
    .await;
    let err = replicate_error(result);
    assert!(
        matches!(
            err,
            ReplicateError::Timeout {
                phase: multifeed_replicate::Phase::Replication
            }
        ),
        "{err}"
    );
}

#[async_std::test]
async fn a_live_peer_that_goes_silent_is_dropped() {
    // Was: a stalled live peer stayed connected past 70 s.
    let honest = writer_store(1).await;
    let options = ReplicateOptions::new(false)
        .live(true)
        .live_timeout(Duration::from_millis(800));
    let started = std::time::Instant::now();
    let result = against(
        &honest,
        options,
        Duration::from_secs(20),
        |socket| async move {
            let mut session = Session::start(socket, true, Vec::new()).await;
            session.until(|s| s.exchange.remote_handshake_done()).await;
            // Connected, and silent from here on.
            Some(session)
        },
    )
    .await;
    let err = replicate_error(result);
    assert!(
        matches!(
            err,
            ReplicateError::Timeout {
                phase: multifeed_replicate::Phase::LiveKeepAlive
            }
        ),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[async_std::test]
async fn idle_live_peers_keep_each_other_alive() {
    let (a, b) = (writer_store(1).await, writer_store(1).await);
    let (left, right) = Socket::pair().expect("socket pair");
    let options = |initiator| {
        ReplicateOptions::new(initiator)
            .live(true)
            .live_timeout(Duration::from_millis(1_000))
            .keepalive_interval(Duration::from_millis(100))
    };
    let (oa, ob) = (options(true), options(false));
    let (stop_a, stop_b) = (oa.stop_handle(), ob.stop_handle());
    let stopper = async {
        // Several live timeouts of silence from the application: only keep-alives flow.
        async_std::task::sleep(Duration::from_millis(3_000)).await;
        stop_a.stop();
        stop_b.stop();
    };
    let (ra, rb, ()) = within("both live sides to stop", Duration::from_secs(20), async {
        futures::join!(a.replicate(left, oa), b.replicate(right, ob), stopper)
    })
    .await;
    ra.expect("a stays connected until stopped");
    rb.expect("b stays connected until stopped");
    assert_eq!(a.feeds().len(), 2);
}

#[async_std::test]
async fn errors_name_the_phase_they_happened_in() {
    use futures::AsyncWriteExt;
    // A peer that never starts the Noise handshake: a handshake timeout, not "replication".
    let honest = Multifeed::open_memory().await.expect("memory store");
    let (ours, _silent) = Socket::pair().expect("socket pair");
    let options = ReplicateOptions::new(false)
        .timeouts(Duration::from_millis(300), Duration::from_millis(100));
    let err = replicate_error(
        within(
            "a handshake timeout",
            Duration::from_secs(10),
            honest.replicate(ours, options),
        )
        .await,
    );
    assert!(
        matches!(
            err,
            ReplicateError::Timeout {
                phase: multifeed_replicate::Phase::NoiseHandshake
            }
        ),
        "{err}"
    );
    // Garbage right after a completed Noise handshake: blamed on what came after it.
    let quick =
        || ReplicateOptions::new(false).timeouts(Duration::from_secs(3), Duration::from_secs(3));
    for seed in 0..100u8 {
        let (ours, theirs) = Socket::pair().expect("socket pair");
        let mut raw = theirs.clone();
        let result = within(
            "the honest side to end",
            Duration::from_secs(10),
            futures::future::join(honest.replicate(ours, quick()), async move {
                let peer = HostilePeer::handshake(theirs, true).await.expect("noise");
                // One complete frame of junk: it cannot decrypt.
                let mut garbage = vec![197, 0, 0];
                garbage.extend((0..197u8).map(|i| i.wrapping_mul(seed).wrapping_add(7)));
                let _ = raw.write_all(&garbage).await;
                peer
            }),
        )
        .await
        .0;
        let err = replicate_error(result);
        match &err {
            ReplicateError::Io { phase, .. } | ReplicateError::Peer { phase, .. } => {
                assert_ne!(*phase, multifeed_replicate::Phase::NoiseHandshake, "{err}")
            }
            ReplicateError::Timeout { phase } => {
                assert_ne!(*phase, multifeed_replicate::Phase::NoiseHandshake, "{err}")
            }
            _ => {}
        }
    }
}

#[async_std::test]
async fn junk_after_both_sides_synced_does_not_undo_a_completed_sync() {
    // Was: junk after both sides sent SYNCED turned a completed sync into
    // ERR_UNEXPECTED_MESSAGE.
    let honest = writer_store(1).await;
    let result = against(
        &honest,
        ReplicateOptions::new(false),
        Duration::from_secs(20),
        |socket| async move {
            let mut session = Session::start(socket, false, Vec::new()).await;
            // We want nothing of the honest side's offers; it wants nothing of ours (none), so
            // it reports SYNCED first.
            session.until(|s| !s.offered.is_empty()).await;
            let actions = session.exchange.request(Vec::new());
            session.apply(actions).await;
            session.until(|s| s.remote_synced).await;
            let actions = session.exchange.local_synced();
            let mut messages = Vec::new();
            for action in actions {
                if let Action::Send(message) = action {
                    messages.push(Message::Extension(Extension {
                        name: "multifeed".to_owned(),
                        message: message.encode(),
                    }));
                }
            }
            // The same frame goes on with a message no exchange expects after SYNCED.
            let junk = multifeed_meta::Message::Handshake {
                client: "MULTIFEED".to_owned(),
                version: multifeed_meta::PROTOCOL_VERSION,
                user_data: Vec::new(),
                nonce: [0; 16],
            };
            messages.push(Message::Extension(Extension {
                name: "multifeed".to_owned(),
                message: junk.encode(),
            }));
            let frame = batch_frame(ROOT, &messages).expect("frame");
            session.peer.send_frame(frame).await.expect("sent");
            Some(session)
        },
    )
    .await;
    result.expect("the sync completed");
}

#[async_std::test]
async fn an_answer_about_another_block_is_ignored_not_an_invalid_proof() {
    // Was: a valid proof that answered another request than the one asked was applied and
    // reported as ERR_INVALID_PROOF ("index out of bounds").
    use hypercore::{HypercoreBuilder, Storage};
    let storage = Storage::new_memory().await.expect("memory storage");
    let mut core = HypercoreBuilder::new(storage).build().await.expect("core");
    for i in 0..5 {
        core.append(format!("entry {i}").as_bytes())
            .await
            .expect("append");
    }
    let key = core.key_pair().public.to_bytes();
    let honest = Multifeed::open_memory().await.expect("memory store");
    let result = against(
        &honest,
        ReplicateOptions::new(false),
        Duration::from_secs(30),
        |socket| async move {
            let mut session = Session::agreed_on(socket, key, 5).await;
            let actions = session.exchange.local_synced();
            session.apply(actions).await;
            session.open_feed_channel(&key, 5).await;
            let mut misled = 0;
            while let Ok(messages) = session.peer.next_messages().await {
                for (_, message) in messages {
                    let Message::Request(request) = message else {
                        continue;
                    };
                    let mut block = request.block.clone();
                    let mut upgrade = request.upgrade.clone();
                    // The first answers are valid proofs of something not asked for: the next
                    // block instead, or the block with an upgrade that was not asked for.
                    if misled < 6 {
                        if let Some(block) = block.as_mut() {
                            if upgrade.is_none() && misled % 2 == 1 {
                                upgrade = Some(hypercore_schema::RequestUpgrade {
                                    start: 0,
                                    length: 5,
                                });
                            } else {
                                block.index = (block.index + 1) % 5;
                            }
                            misled += 1;
                        }
                    }
                    let proof = core
                        .create_proof(block, None, None, upgrade)
                        .await
                        .expect("a proof")
                        .expect("we hold it");
                    let data = Message::Data(Data {
                        request: request.id,
                        fork: proof.fork,
                        block: proof.block,
                        hash: proof.hash,
                        seek: proof.seek,
                        upgrade: proof.upgrade,
                    });
                    let frame = message_frame(FEED, &data).expect("frame");
                    if session.peer.send_frame(frame).await.is_err() {
                        break;
                    }
                }
            }
            assert!(misled > 0, "the honest side asked for a block");
            None::<Session>
        },
    )
    .await;
    result.expect("the misdirected answers were ignored and asked again");
    let feed = honest
        .feed(key)
        .expect("key")
        .expect("the feed was recorded");
    assert_eq!(feed.len().await.expect("len"), 5);
    for i in 0..5 {
        let entry = feed.get(i).await.expect("get").expect("entry present");
        assert_eq!(entry, format!("entry {i}").into_bytes());
    }
}
