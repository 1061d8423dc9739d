//! The exchange state machine: handshake, offers, requests, agreement, end of sync.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::message::{FeedKey, FeedOffer, Message, MAX_KEYS_PER_MESSAGE};
use crate::MetaError;

/// Our client name, as JS multifeed sends it.
pub const CLIENT: &str = "MULTIFEED";
/// The version of this exchange protocol. Peers with another major version are refused.
pub const PROTOCOL_VERSION: semver::Version = semver::Version::new(1, 0, 0);

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
}

impl Default for ExchangeConfig {
    fn default() -> Self {
        Self {
            client: CLIENT.to_owned(),
            version: PROTOCOL_VERSION,
            user_data: Vec::new(),
            live: false,
            max_remote_feeds: 100_000,
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
    /// These feeds are agreed: replicate each on its own channel.
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
    /// Offers made before the peer's handshake arrived.
    queued: Vec<FeedOffer>,
    /// Whether a round of offers waits for the handshake (even an empty one).
    round_queued: bool,
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
            round_queued: false,
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
        })]
    }

    /// Offers feeds; already offered keys are skipped. Sent once the peer's handshake is accepted.
    pub fn offer(&mut self, feeds: Vec<FeedOffer>) -> Vec<Action> {
        let mut fresh = Vec::new();
        for feed in feeds {
            if let std::collections::hash_map::Entry::Vacant(slot) = self.offered.entry(feed.key) {
                slot.insert(feed.length);
                fresh.push(feed);
            }
        }
        if self.state == State::Ready {
            if fresh.is_empty() {
                return Vec::new();
            }
            return manifests(fresh);
        }
        self.queued.extend(fresh);
        self.round_queued = true;
        Vec::new()
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
                let mut actions = vec![Action::RemoteHandshake { version, user_data }];
                if self.round_queued {
                    self.round_queued = false;
                    actions.extend(manifests(std::mem::take(&mut self.queued)));
                }
                Ok(actions)
            }
            (State::Ready | State::Finished, Message::Manifest { feeds, complete }) => {
                let mut fresh = Vec::new();
                for feed in feeds {
                    if self.remote_offers.contains_key(&feed.key) {
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
            (State::Ready, Message::Synced) => {
                self.remote_synced = true;
                Ok(self.check_finished())
            }
            (State::Finished, Message::Synced) => Ok(Vec::new()),
            (state, message) => Err(unexpected(state, &message)),
        }
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
