//! The exchange state machine: handshake, reconciliation of the offered sets, offers,
//! requests, agreement, end of sync.

use std::collections::VecDeque;

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};

use crate::message::{FeedKey, FeedOffer, Message, MAX_KEYS_PER_MESSAGE};
use crate::reconcile::{incomplete_item_id, item_id, IdKey, ItemId, Reconciler};
use crate::MetaError;

/// Our client name, as JS multifeed sends it.
pub const CLIENT: &str = "MULTIFEED";
/// The version of this exchange protocol. Peers with another major version are refused.
///
/// 2.0.0 reconciles the offered sets before offering (1.x offered every feed every time).
/// 2.1.0 adds no message: it tells the peer that we reopen a live feed's channel on news after
/// it was closed idle (see [`REOPENS_IDLE_CHANNELS`]), so a 2.1 initiator may close idle
/// channels towards us. A 2.0 peer keeps every live channel open, as before.
pub const PROTOCOL_VERSION: semver::Version = semver::Version::new(2, 1, 0);

/// The first protocol version whose live peers reopen a feed's channel when they have news for
/// it, after the initiator closed it idle.
pub const REOPENS_IDLE_CHANNELS: semver::Version = semver::Version::new(2, 1, 0);

/// Settings of one exchange.
#[derive(Debug, Clone)]
pub struct ExchangeConfig {
    /// Our client name (default [`CLIENT`]).
    pub client: String,
    /// Our protocol version (default [`PROTOCOL_VERSION`]).
    pub version: semver::Version,
    /// Opaque data sent in our handshake.
    pub user_data: Vec<u8>,
    /// Live exchanges never finish; non-live ones finish when both sides are synced.
    pub live: bool,
    /// The most feeds a peer may offer on one exchange (default 100,000).
    pub max_remote_feeds: usize,
    /// Whether we drive the reconciliation (the replication's initiator); the other side
    /// answers. Exactly one side of a connection must.
    pub initiator: bool,
    /// 16 random bytes for our handshake (default: fresh from the thread's CSPRNG). XORed
    /// with the peer's, they key the connection's item ids, so that no third party can plant a
    /// feed whose item collides with another's ([`item_id`](crate::item_id)). Set it only to
    /// make a test deterministic.
    pub nonce: [u8; 16],
}

impl Default for ExchangeConfig {
    fn default() -> Self {
        Self {
            client: CLIENT.to_owned(),
            version: PROTOCOL_VERSION,
            user_data: Vec::new(),
            live: false,
            max_remote_feeds: 100_000,
            initiator: false,
            nonce: rand::random(),
        }
    }
}

/// What the driver must do after feeding the exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// Send this message to the peer.
    Send(Message),
    /// The peer's handshake was accepted.
    RemoteHandshake {
        /// Its protocol version.
        version: semver::Version,
        /// Its application data.
        user_data: Vec<u8>,
    },
    /// The peer offered these feeds (new ones only); answer with [`Exchange::request`].
    RemoteOffered(Vec<FeedOffer>),
    /// These feeds are agreed: replicate each on its own channel. Live, the feeds both sides
    /// hold the same when they connect are agreed too, without a word (their later entries
    /// come over their channels).
    Replicate(Vec<FeedKey>),
    /// Both sides are synced (non-live only): the exchange is over.
    Finished,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    New,
    AwaitingHandshake,
    Ready,
    Finished,
}

/// Our first round: the reconciliation, then the offers of what the peer lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Round {
    /// Not begun: no handshake yet, or nothing offered yet.
    Waiting,
    /// negentropy rounds under way (initiator), or waiting for the need list (responder).
    Reconciling,
    /// Our offers of the round are sent; later offers go out as they come.
    Sent,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            Self::New => "NEW",
            Self::AwaitingHandshake => "AWAITING_HANDSHAKE",
            Self::Ready => "READY",
            Self::Finished => "FINISHED",
        }
    }
}

/// The sans-IO state machine of one multifeed exchange.
#[derive(Debug)]
pub struct Exchange {
    config: ExchangeConfig,
    state: State,
    /// Offers made before our first round began: the set we reconcile.
    queued: Vec<FeedOffer>,
    /// The key of this connection's item ids: the two handshake nonces XORed.
    id_key: IdKey,
    /// Feeds we hold with gaps (key and contiguous length), marked before the round began.
    incomplete: HashMap<FeedKey, u64>,
    /// Whether our first round waits for the handshake (even an empty one).
    round_queued: bool,
    round: Round,
    reconciler: Option<Reconciler>,
    /// Offers made while our first round was under way: sent with it.
    late: Vec<FeedOffer>,
    /// Responder: the item ids the initiator asked for so far.
    needed: HashSet<ItemId>,
    /// Every feed we offer, with the length it was last offered at.
    local: HashMap<FeedKey, u64>,
    /// The first offers, not in `local` yet: indexed at the next offer (a connection that
    /// offers once, as every non-live one does, never builds that map).
    first_offers: Vec<(FeedKey, u64)>,
    /// Feeds sent to the peer in manifests (the ones it may request).
    offered: HashMap<FeedKey, u64>,
    remote_offers: HashMap<FeedKey, u64>,
    /// Remote offers not yet answered with [`Exchange::request`].
    undecided: HashSet<FeedKey>,
    remote_round_complete: bool,
    outstanding: VecDeque<Vec<FeedKey>>,
    /// Keys we requested and the peer agreed to send, with the length it offered.
    wanted: HashMap<FeedKey, u64>,
    agreed: HashSet<FeedKey>,
    local_synced: bool,
    remote_synced: bool,
}

impl Exchange {
    /// A new exchange; call [`start`](Self::start) to send our handshake.
    pub fn new(config: ExchangeConfig) -> Self {
        Self {
            config,
            state: State::New,
            queued: Vec::new(),
            id_key: [0; 16],
            incomplete: HashMap::new(),
            round_queued: false,
            round: Round::Waiting,
            reconciler: None,
            late: Vec::new(),
            needed: HashSet::new(),
            local: HashMap::new(),
            first_offers: Vec::new(),
            offered: HashMap::new(),
            remote_offers: HashMap::new(),
            undecided: HashSet::new(),
            remote_round_complete: false,
            outstanding: VecDeque::new(),
            wanted: HashMap::new(),
            agreed: HashSet::new(),
            local_synced: false,
            remote_synced: false,
        }
    }

    /// Sends our handshake.
    pub fn start(&mut self) -> Vec<Action> {
        if self.state != State::New {
            return Vec::new();
        }
        self.state = State::AwaitingHandshake;
        vec![Action::Send(Message::Handshake {
            client: self.config.client.clone(),
            version: self.config.version.clone(),
            user_data: self.config.user_data.clone(),
            nonce: self.config.nonce,
        })]
    }

    /// Offers feeds. Before the handshake they form the set we reconcile with the peer's;
    /// after it, a feed is offered again only at a greater length and only while it is not
    /// agreed (an agreed feed's later entries come over its channel).
    pub fn offer(&mut self, feeds: Vec<FeedOffer>) -> Vec<Action> {
        let fresh = if self.local.is_empty() && self.first_offers.is_empty() {
            // The first offers: nothing to compare them with. (Repeats of a key within them
            // are all offered; the reconciliation keeps one item per key and length.)
            self.first_offers = feeds.iter().map(|feed| (feed.key, feed.length)).collect();
            feeds
        } else {
            self.index_first_offers();
            self.fresh_offers(feeds)
        };
        self.offer_fresh(fresh)
    }

    /// Moves the first offers into `local`.
    fn index_first_offers(&mut self) {
        let first = std::mem::take(&mut self.first_offers);
        self.local.reserve(first.len());
        for (key, length) in first {
            let known = self.local.entry(key).or_insert(length);
            *known = (*known).max(length);
        }
    }

    /// The offers not made already at the same or a greater length (nor agreed); recorded.
    fn fresh_offers(&mut self, feeds: Vec<FeedOffer>) -> Vec<FeedOffer> {
        self.local.reserve(feeds.len());
        let mut fresh = Vec::with_capacity(feeds.len());
        for feed in feeds {
            let known = self.local.get(&feed.key).copied();
            if known.is_some_and(|length| length >= feed.length)
                || (known.is_some() && self.agreed.contains(&feed.key))
            {
                continue;
            }
            self.local.insert(feed.key, feed.length);
            fresh.push(feed);
        }
        fresh
    }

    fn offer_fresh(&mut self, fresh: Vec<FeedOffer>) -> Vec<Action> {
        match (self.state, self.round) {
            (State::Ready | State::Finished, Round::Sent) => {
                if fresh.is_empty() {
                    return Vec::new();
                }
                self.manifests(fresh)
            }
            (State::Ready, Round::Reconciling) => {
                self.late.extend(fresh);
                Vec::new()
            }
            (State::Ready, Round::Waiting) => {
                if self.queued.is_empty() {
                    self.queued = fresh;
                } else {
                    self.queued.extend(fresh);
                }
                self.round_queued = true;
                // Building a sealed negentropy set of our own offers cannot fail (its only
                // errors are misuse of an unsealed or resealed set); nothing to report to a peer.
                self.begin_round().unwrap_or_default()
            }
            _ => {
                self.queued.extend(fresh);
                self.round_queued = true;
                Vec::new()
            }
        }
    }

    /// Marks feeds we hold with gaps (key, contiguous length), before the handshake: they are
    /// always offered, since the peer may fill the gaps.
    pub fn mark_incomplete(&mut self, feeds: impl IntoIterator<Item = (FeedKey, u64)>) {
        if self.round == Round::Waiting {
            self.incomplete.extend(feeds);
        }
    }

    /// Requests the given remote offers; every offer not listed is declined.
    pub fn request(&mut self, keys: Vec<FeedKey>) -> Vec<Action> {
        let keys: Vec<FeedKey> = keys
            .into_iter()
            .filter(|key| self.undecided.remove(key))
            .collect();
        // Everything offered so far is now decided.
        self.undecided.clear();
        if keys.is_empty() {
            return Vec::new();
        }
        let mut actions = Vec::new();
        for chunk in keys.chunks(MAX_KEYS_PER_MESSAGE) {
            self.outstanding.push_back(chunk.to_vec());
            actions.push(Action::Send(Message::RequestFeeds {
                keys: chunk.to_vec(),
            }));
        }
        actions
    }

    /// Reports that every wanted feed reached its offered length; sends SYNCED once.
    pub fn local_synced(&mut self) -> Vec<Action> {
        if self.local_synced || self.state != State::Ready {
            return Vec::new();
        }
        self.local_synced = true;
        let mut actions = vec![Action::Send(Message::Synced)];
        actions.extend(self.check_finished());
        actions
    }

    /// Whether the peer's round of offers is complete and every request is answered, so that
    /// [`wanted`](Self::wanted) is final for now.
    pub fn settled(&self) -> bool {
        self.state == State::Ready
            && self.remote_round_complete
            && self.outstanding.is_empty()
            && self.undecided.is_empty()
    }

    /// Feeds we requested and the peer agreed to send, with the length it offered.
    pub fn wanted(&self) -> &HashMap<FeedKey, u64> {
        &self.wanted
    }

    /// The length the peer offered for `key`, if it offered it.
    pub fn remote_length(&self, key: &FeedKey) -> Option<u64> {
        self.remote_offers.get(key).copied()
    }

    /// Whether `key` is agreed for replication in either direction.
    pub fn is_agreed(&self, key: &FeedKey) -> bool {
        self.agreed.contains(key)
    }

    /// Whether the peer's handshake was accepted.
    pub fn remote_handshake_done(&self) -> bool {
        matches!(self.state, State::Ready | State::Finished)
    }

    /// Whether the exchange finished (both sides synced, non-live).
    pub fn is_finished(&self) -> bool {
        self.state == State::Finished
    }

    /// Handles received bytes.
    pub fn handle(&mut self, bytes: &[u8]) -> Result<Vec<Action>, MetaError> {
        let message = Message::decode(bytes)?;
        self.handle_message(message)
    }

    /// Handles a received message.
    pub fn handle_message(&mut self, message: Message) -> Result<Vec<Action>, MetaError> {
        let unexpected = |state: State, message: &Message| MetaError::UnexpectedMessage {
            state: state.name(),
            message: message.name(),
        };
        match (self.state, message) {
            (
                State::AwaitingHandshake,
                Message::Handshake {
                    client,
                    version,
                    user_data,
                    nonce,
                },
            ) => {
                if client != self.config.client {
                    return Err(MetaError::ClientMismatch {
                        ours: self.config.client.clone(),
                        theirs: client,
                    });
                }
                if !compatible(&self.config.version, &version) {
                    return Err(MetaError::VersionMismatch {
                        ours: self.config.version.clone(),
                        theirs: version,
                    });
                }
                self.state = State::Ready;
                for (key, (ours, theirs)) in self
                    .id_key
                    .iter_mut()
                    .zip(self.config.nonce.iter().zip(nonce))
                {
                    *key = ours ^ theirs;
                }
                let mut actions = vec![Action::RemoteHandshake { version, user_data }];
                if self.round_queued {
                    actions.extend(self.begin_round()?);
                }
                Ok(actions)
            }
            (State::Ready | State::Finished, Message::Manifest { feeds, complete }) => {
                let mut fresh = Vec::new();
                for feed in feeds {
                    if let Some(&length) = self.remote_offers.get(&feed.key) {
                        // Offered again, longer, and not agreed yet: a new offer.
                        if length < feed.length && !self.agreed.contains(&feed.key) {
                            self.remote_offers.insert(feed.key, feed.length);
                            self.undecided.insert(feed.key);
                            fresh.push(feed);
                        }
                        continue;
                    }
                    if self.remote_offers.len() >= self.config.max_remote_feeds {
                        return Err(MetaError::TooManyFeeds {
                            limit: self.config.max_remote_feeds,
                        });
                    }
                    self.remote_offers.insert(feed.key, feed.length);
                    self.undecided.insert(feed.key);
                    fresh.push(feed);
                }
                if complete {
                    self.remote_round_complete = true;
                }
                Ok(if fresh.is_empty() {
                    Vec::new()
                } else {
                    vec![Action::RemoteOffered(fresh)]
                })
            }
            (State::Ready | State::Finished, Message::RequestFeeds { keys }) => {
                let will: Vec<FeedKey> = keys
                    .into_iter()
                    .filter(|key| self.offered.contains_key(key))
                    .collect();
                let mut actions =
                    vec![Action::Send(Message::ReplicateFeeds { keys: will.clone() })];
                let new: Vec<FeedKey> = will
                    .into_iter()
                    .filter(|key| self.agreed.insert(*key))
                    .collect();
                if !new.is_empty() {
                    actions.push(Action::Replicate(new));
                }
                Ok(actions)
            }
            (State::Ready | State::Finished, message @ Message::ReplicateFeeds { .. }) => {
                let Message::ReplicateFeeds { keys } = &message else {
                    return Err(unexpected(self.state, &message));
                };
                let Some(requested) = self.outstanding.front() else {
                    return Err(unexpected(self.state, &message));
                };
                if keys.iter().any(|key| !requested.contains(key)) {
                    return Err(unexpected(self.state, &message));
                }
                self.outstanding.pop_front();
                // Every key is reported, also one already agreed the other way: it now has a
                // download target.
                for key in keys {
                    let length = self.remote_offers.get(key).copied().unwrap_or(0);
                    self.wanted.insert(*key, length);
                    self.agreed.insert(*key);
                }
                Ok(if keys.is_empty() {
                    Vec::new()
                } else {
                    vec![Action::Replicate(keys.clone())]
                })
            }
            (State::Ready, message @ (Message::Reconcile { .. } | Message::Need { .. })) => {
                if self.round != Round::Reconciling {
                    return Err(unexpected(self.state, &message));
                }
                match message {
                    Message::Reconcile { data } if self.config.initiator => self.reconciled(&data),
                    Message::Reconcile { data } => {
                        let Some(reconciler) = self.reconciler.as_mut() else {
                            return Err(unexpected(self.state, &Message::Reconcile { data }));
                        };
                        let answer = reconciler.answer(&data)?;
                        Ok(vec![Action::Send(Message::Reconcile { data: answer })])
                    }
                    Message::Need { ids, complete } if !self.config.initiator => {
                        self.needed(ids, complete)
                    }
                    other => Err(unexpected(self.state, &other)),
                }
            }
            (State::Ready, Message::Synced) => {
                self.remote_synced = true;
                Ok(self.check_finished())
            }
            (State::Finished, Message::Synced) => Ok(Vec::new()),
            (state, message) => Err(unexpected(state, &message)),
        }
    }

    /// Starts our first round, once the handshake is accepted and the first offers are in:
    /// the initiator sends negentropy's first message; the responder waits for it.
    fn begin_round(&mut self) -> Result<Vec<Action>, MetaError> {
        self.round_queued = false;
        self.round = Round::Reconciling;
        let initiator = self.config.initiator;
        let items = std::mem::take(&mut self.queued)
            .into_iter()
            .map(|offer| {
                let id = match self.incomplete.get(&offer.key) {
                    Some(&contiguous) => {
                        incomplete_item_id(&self.id_key, &offer.key, contiguous, initiator)
                    }
                    None => item_id(&self.id_key, &offer.key, offer.length),
                };
                (id, offer)
            })
            .collect();
        self.incomplete = HashMap::new();
        let mut reconciler = Reconciler::new(items)?;
        let actions = if initiator {
            vec![Action::Send(Message::Reconcile {
                data: reconciler.initiate()?,
            })]
        } else {
            Vec::new()
        };
        self.reconciler = Some(reconciler);
        Ok(actions)
    }

    /// Initiator: the responder answered a round; the next round, or the end of ours.
    fn reconciled(&mut self, answer: &[u8]) -> Result<Vec<Action>, MetaError> {
        let max_need = self.config.max_remote_feeds;
        let Some(reconciler) = self.reconciler.as_mut() else {
            return Ok(Vec::new());
        };
        if let Some(next) = reconciler.step(answer, max_need)? {
            return Ok(vec![Action::Send(Message::Reconcile { data: next })]);
        }
        let (have, lacking, need) = reconciler.outcome();
        // Ours the peer lacks (and the ones we hold with gaps, whose ids never match), then
        // the peer's we lack.
        let mut actions = self.end_round(have, &|id| lacking.contains(id));
        let last = need.len().saturating_sub(1) / MAX_KEYS_PER_MESSAGE;
        let mut chunks: Vec<Vec<ItemId>> = need
            .chunks(MAX_KEYS_PER_MESSAGE)
            .map(<[ItemId]>::to_vec)
            .collect();
        if chunks.is_empty() {
            chunks.push(Vec::new());
        }
        for (i, ids) in chunks.into_iter().enumerate() {
            actions.push(Action::Send(Message::Need {
                ids,
                complete: i == last,
            }));
        }
        Ok(actions)
    }

    /// Responder: a part of the initiator's need list; the offers it names once complete.
    fn needed(&mut self, ids: Vec<ItemId>, complete: bool) -> Result<Vec<Action>, MetaError> {
        let Some(reconciler) = self.reconciler.as_ref() else {
            return Ok(Vec::new());
        };
        // Only ids of our own items are kept: the list cannot grow past our set.
        self.needed
            .extend(ids.into_iter().filter(|id| reconciler.holds(id)));
        if !complete {
            return Ok(Vec::new());
        }
        let offers = reconciler.in_offered_order(self.needed.iter());
        let needed = std::mem::take(&mut self.needed);
        Ok(self.end_round(offers, &|id| needed.contains(id)))
    }

    /// Sends the offers of our first round (with the late ones), and, live, agrees on the
    /// feeds both sides hold the same (the items the peer does not lack).
    fn end_round(
        &mut self,
        offers: Vec<FeedOffer>,
        lacking: &dyn Fn(&ItemId) -> bool,
    ) -> Vec<Action> {
        self.round = Round::Sent;
        let common = match (&self.reconciler, self.config.live) {
            (Some(reconciler), true) => reconciler.common(lacking),
            _ => Vec::new(),
        };
        self.reconciler = None;
        let mut offers = offers;
        offers.extend(std::mem::take(&mut self.late));
        let mut actions = self.manifests(offers);
        let common: Vec<FeedKey> = common
            .into_iter()
            // A feed that grew meanwhile was offered at its new length instead.
            .filter(|offer| !self.offered.contains_key(&offer.key))
            .map(|offer| {
                self.wanted.insert(offer.key, offer.length);
                self.remote_offers.insert(offer.key, offer.length);
                self.agreed.insert(offer.key);
                offer.key
            })
            .collect();
        if !common.is_empty() {
            actions.push(Action::Replicate(common));
        }
        actions
    }

    /// One batch of offers as manifests within the key limit, the last one marked complete.
    fn manifests(&mut self, feeds: Vec<FeedOffer>) -> Vec<Action> {
        for feed in &feeds {
            self.offered.insert(feed.key, feed.length);
        }
        manifests(feeds)
    }

    fn check_finished(&mut self) -> Vec<Action> {
        if !self.config.live && self.local_synced && self.remote_synced {
            self.state = State::Finished;
            vec![Action::Finished]
        } else {
            Vec::new()
        }
    }
}

/// Whether two protocol versions can talk: same major (same minor too for 0.x, as cargo has it).
fn compatible(ours: &semver::Version, theirs: &semver::Version) -> bool {
    if ours.major == 0 || theirs.major == 0 {
        ours.major == theirs.major && ours.minor == theirs.minor
    } else {
        ours.major == theirs.major
    }
}

/// One round of offers as manifests within the key limit, the last one marked complete.
fn manifests(feeds: Vec<FeedOffer>) -> Vec<Action> {
    if feeds.is_empty() {
        return vec![Action::Send(Message::Manifest {
            feeds,
            complete: true,
        })];
    }
    let chunks: Vec<&[FeedOffer]> = feeds.chunks(MAX_KEYS_PER_MESSAGE).collect();
    let last = chunks.len() - 1;
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, chunk)| {
            Action::Send(Message::Manifest {
                feeds: chunk.to_vec(),
                complete: i == last,
            })
        })
        .collect()
}
