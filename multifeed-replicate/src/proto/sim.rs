//! Two [`Connection`]s stepped against each other in one thread, with fake feeds, a fake wire
//! and virtual time (quinn-proto's `Pair`, str0m's "always handle the earliest deadline").
//!
//! A fake feed's block `i` is `value(key, i)`; a proof "verifies" when its block is that value
//! and its upgrade ends within the writer's length. The wire keeps hypercore-protocol's order
//! (FIFO per direction, a channel usable once both sides opened it), with seeded latency,
//! jitter and answers delivered out of order (as JS peers answer). No runtime, no storage, no
//! clock: the same seed gives the same run, step for step.

#![cfg_attr(not(test), allow(dead_code))]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use hypercore_protocol::discovery_key;
use hypercore_protocol::schema::Request;
use hypercore_protocol::Message;
use hypercore_schema::{DataBlock, DataUpgrade, Proof};
use multifeed_storage::FeedKey;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::adapter::{servable, Applied};
use crate::proto::{Connection, DiscoveryKey, FeedInfo, FeedView, Opened, Output, Purpose};
use crate::{LocalFeed, ReplicateConfig, ReplicateError, ReplicateSummary, ReplicationEvent};

/// A usable ed25519 public key, the same for the same `n`.
pub(crate) fn key(n: u8) -> FeedKey {
    hypercore::SigningKey::from_bytes(&[n; 32])
        .verifying_key()
        .to_bytes()
}

/// Another usable key per `n` (for stores of many feeds).
#[allow(dead_code)]
pub(crate) fn many_key(n: u32) -> FeedKey {
    let mut seed = [7u8; 32];
    seed[..4].copy_from_slice(&n.to_le_bytes());
    hypercore::SigningKey::from_bytes(&seed)
        .verifying_key()
        .to_bytes()
}

/// Block `index` of feed `key`.
pub(crate) fn value(key: &FeedKey, index: u64) -> Vec<u8> {
    let mut value = key[..4].to_vec();
    value.extend(index.to_le_bytes());
    value
}

/// A feed in memory: its signed length and the blocks held.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct FakeFeed {
    pub(crate) length: u64,
    pub(crate) blocks: std::collections::BTreeSet<u64>,
}

impl FakeFeed {
    /// A feed of `length` blocks, all held.
    pub(crate) fn full(length: u64) -> Self {
        Self {
            length,
            blocks: (0..length).collect(),
        }
    }

    /// A feed of `length` blocks holding only those `held` says.
    pub(crate) fn sparse(length: u64, held: impl Fn(u64) -> bool) -> Self {
        Self {
            length,
            blocks: (0..length).filter(|&i| held(i)).collect(),
        }
    }

    /// Whether every block below its length is held.
    pub(crate) fn complete(&self) -> bool {
        self.blocks.len() as u64 == self.length
    }
}

impl FeedView for FakeFeed {
    fn info(&self) -> FeedInfo {
        let mut contiguous = 0;
        while self.blocks.contains(&contiguous) {
            contiguous += 1;
        }
        FeedInfo {
            fork: 0,
            length: self.length,
            contiguous_length: contiguous,
        }
    }

    fn has(&self, index: u64) -> bool {
        self.blocks.contains(&index)
    }
}

/// Which feed a tracked discovery key is, as the driver's core handle.
#[derive(Debug, Clone, Copy)]
enum Handle {
    Host(FeedKey),
    Probe(FeedKey),
}

/// What crosses the fake wire.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub(crate) enum Wire {
    Open(DiscoveryKey),
    Close(DiscoveryKey),
    Message(DiscoveryKey, Message),
}

/// One side: a connection, the feeds of its host, and the fake protocol's channel state.
pub(crate) struct Peer {
    pub(crate) conn: Connection,
    /// The host's feeds.
    pub(crate) feeds: BTreeMap<FeedKey, FakeFeed>,
    probes: HashMap<DiscoveryKey, FakeFeed>,
    handles: HashMap<DiscoveryKey, Handle>,
    local_open: HashSet<DiscoveryKey>,
    remote_open: HashSet<DiscoveryKey>,
    /// What ended the connection with an error, if anything did.
    pub(crate) error: Option<ReplicateError>,
    /// Events reported to the application.
    pub(crate) events: Vec<ReplicationEvent>,
    /// Durability syncs asked for.
    pub(crate) syncs: usize,
    /// The most channels open both ways at once (the root included).
    pub(crate) max_open_channels: usize,
    /// The writers' lengths (what an upgrade may claim).
    truth: BTreeMap<FeedKey, u64>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("feeds", &self.feeds)
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl Peer {
    pub(crate) fn new(
        config: ReplicateConfig,
        feeds: BTreeMap<FeedKey, FakeFeed>,
        now: Instant,
    ) -> Self {
        Self {
            conn: Connection::new(config, now),
            feeds,
            probes: HashMap::new(),
            handles: HashMap::new(),
            local_open: HashSet::new(),
            remote_open: HashSet::new(),
            error: None,
            events: Vec::new(),
            syncs: 0,
            max_open_channels: 0,
            truth: BTreeMap::new(),
        }
    }

    /// Whether the connection ended (normally or with an error).
    pub(crate) fn ended(&self) -> bool {
        self.error.is_some() || self.conn.is_done()
    }

    pub(crate) fn summary(&self) -> ReplicateSummary {
        *self.conn.summary()
    }

    /// Appends `n` blocks to a feed of ours and tells the connection (live).
    pub(crate) fn append(&mut self, key: FeedKey, n: u64, now: Instant, wire: &mut Vec<Wire>) {
        self.append_heard(key, n, now, wire, crate::LocalChange::Feed(key));
    }

    /// Appends, and the host's change stream reports `change` (`Lagged`: the change was lost).
    pub(crate) fn append_heard(
        &mut self,
        key: FeedKey,
        n: u64,
        now: Instant,
        wire: &mut Vec<Wire>,
        change: crate::LocalChange,
    ) {
        let feed = self.feeds.entry(key).or_default();
        for _ in 0..n {
            feed.blocks.insert(feed.length);
            feed.length += 1;
        }
        let dk = discovery_key(&key);
        if self.handles.contains_key(&dk) {
            let view = self.feeds[&key].clone();
            self.conn.handle_local_change(dk, &view);
            self.drain(now, wire);
        }
        // The host's change stream tells of it too (a parked feed opens again on it).
        self.input(
            now,
            wire,
            |c, _| {
                c.handle_host_change(change);
                Ok(())
            },
            None,
        );
    }

    fn view(&self, dk: &DiscoveryKey) -> Option<FakeFeed> {
        match self.handles.get(dk)? {
            Handle::Host(key) => self.feeds.get(key).cloned(),
            Handle::Probe(_) => self.probes.get(dk).cloned(),
        }
    }

    fn view_mut(&mut self, dk: &DiscoveryKey) -> Option<&mut FakeFeed> {
        match *self.handles.get(dk)? {
            Handle::Host(key) => self.feeds.get_mut(&key),
            Handle::Probe(_) => self.probes.get_mut(dk),
        }
    }

    fn fail(&mut self, result: Result<(), ReplicateError>) {
        if let (Err(err), None) = (result, &self.error) {
            self.error = Some(err);
        }
    }

    /// Hands one input to the connection (through `input`), then carries out every output.
    fn input(
        &mut self,
        now: Instant,
        wire: &mut Vec<Wire>,
        input: impl FnOnce(&mut Connection, Option<&FakeFeed>) -> Result<(), ReplicateError>,
        dk: Option<DiscoveryKey>,
    ) {
        if self.ended() {
            return;
        }
        let view = dk.and_then(|dk| self.view(&dk));
        let result = input(&mut self.conn, view.as_ref());
        self.fail(result);
        self.drain(now, wire);
        let open = self.local_open.intersection(&self.remote_open).count();
        self.max_open_channels = self.max_open_channels.max(open);
        if !self.ended() {
            let result = self.conn.check_synced(now);
            self.fail(result);
            self.drain(now, wire);
        }
    }

    /// Carries out every output, answering those that ask for a fact, as the driver does.
    fn drain(&mut self, now: Instant, wire: &mut Vec<Wire>) {
        while let Some(output) = self.conn.poll_output() {
            if self.error.is_some() {
                return;
            }
            let result = self.carry_out(now, output, wire);
            self.fail(result);
        }
        self.conn.handle_written(0);
        if let Some(progress) = self.conn.poll_progress() {
            self.events.push(progress);
        }
    }

    fn carry_out(
        &mut self,
        now: Instant,
        output: Output,
        wire: &mut Vec<Wire>,
    ) -> Result<(), ReplicateError> {
        match output {
            Output::Send { dk, messages } => {
                if self.local_open.contains(&dk) && self.remote_open.contains(&dk) {
                    wire.extend(messages.into_iter().map(|m| Wire::Message(dk, m)));
                }
            }
            Output::Request {
                dk,
                id,
                fork,
                block,
                upgrade,
            } => {
                let block = block.map(|(index, nodes)| (index, nodes.unwrap_or(0)));
                let request = crate::proto::request(id, fork, block, upgrade);
                if self.local_open.contains(&dk) && self.remote_open.contains(&dk) {
                    wire.push(Wire::Message(dk, Message::Request(request)));
                }
            }
            Output::OpenChannel(key) => {
                let dk = discovery_key(&key);
                if self.local_open.insert(dk) {
                    wire.push(Wire::Open(dk));
                    if self.remote_open.contains(&dk) {
                        let view = self.view(&dk);
                        let view = view.as_ref().map(|v| v as &dyn FeedView);
                        self.conn.handle_channel(now, dk, view)?;
                    }
                }
            }
            Output::CloseChannel(dk) => {
                // As hypercore-protocol: a close ends the channel both ways.
                if self.local_open.remove(&dk) {
                    self.remote_open.remove(&dk);
                    wire.push(Wire::Close(dk));
                }
            }
            Output::ListLocalFeeds => {
                let feeds = self
                    .feeds
                    .iter()
                    .map(|(key, feed)| LocalFeed {
                        key: *key,
                        length: feed.length,
                        contiguous_length: feed.info().contiguous_length,
                        discovery_key: None,
                    })
                    .collect();
                self.conn.handle_local_feeds(now, feeds)?;
            }
            Output::OpenFeed(request) => {
                let dk = discovery_key(&request.key);
                let track = matches!(request.purpose, Purpose::Track { .. });
                let held = match self.handles.get(&dk) {
                    Some(_) if track => self.view(&dk),
                    _ => self.feeds.get(&request.key).cloned(),
                };
                match held {
                    Some(view) => {
                        if track && !self.handles.contains_key(&dk) {
                            self.handles.insert(dk, Handle::Host(request.key));
                        }
                        self.conn
                            .handle_feed_opened(now, request, Opened::Held(&view))?;
                    }
                    None => self
                        .conn
                        .handle_feed_opened(now, request, Opened::Missing)?,
                }
            }
            Output::CreateProbe(request) => {
                let dk = discovery_key(&request.key);
                self.probes.insert(dk, FakeFeed::default());
                self.handles.insert(dk, Handle::Probe(request.key));
                let view = FakeFeed::default();
                self.conn
                    .handle_feed_opened(now, request, Opened::Probe(&view))?;
            }
            Output::DropFeed(dk) => {
                self.handles.remove(&dk);
                self.probes.remove(&dk);
            }
            Output::Serve { dk, request } => {
                let proof = match (self.view(&dk), self.key_of(&dk)) {
                    (Some(feed), Some(key)) => serve(&feed, &key, &request),
                    _ => None,
                };
                self.conn.handle_served(now, dk, request.id, proof);
            }
            Output::Apply { applying, proof } => {
                let dk = applying.dk;
                let key = self.key_of(&dk);
                let truth = key.and_then(|k| self.truth.get(&k).copied());
                let applied = match (self.view_mut(&dk), key) {
                    (Some(feed), Some(key)) => apply(feed, &key, truth, &proof),
                    _ => return Ok(()),
                };
                let view = self.view(&dk).unwrap_or_default();
                self.conn
                    .handle_applied(now, applying, proof, applied, &view)?;
            }
            Output::Promote { dk, key, .. } => {
                let probe = self.probes.remove(&dk).unwrap_or_default();
                self.feeds.entry(key).or_insert(probe);
                self.handles.insert(dk, Handle::Host(key));
            }
            Output::Announce(dk) => {
                let view = self.view(&dk);
                self.conn
                    .handle_announce(dk, view.as_ref().map(|v| v as &dyn FeedView));
            }
            Output::NotifyChanged(_) => {}
            Output::SyncBlocks => self.syncs += 1,
            Output::Event(event) => self.events.push(event),
        }
        Ok(())
    }

    fn key_of(&self, dk: &DiscoveryKey) -> Option<FeedKey> {
        match self.handles.get(dk)? {
            Handle::Host(key) | Handle::Probe(key) => Some(*key),
        }
    }

    /// Something arrived from the other side.
    pub(crate) fn receive(&mut self, now: Instant, item: Wire, wire: &mut Vec<Wire>) {
        match item {
            Wire::Open(dk) => {
                self.remote_open.insert(dk);
                if self.local_open.contains(&dk) {
                    self.input(
                        now,
                        wire,
                        |c, v| c.handle_channel(now, dk, v.map(|v| v as _)),
                        Some(dk),
                    );
                } else {
                    self.input(now, wire, |c, _| c.handle_discovery_key(now, dk), None);
                }
            }
            Wire::Close(dk) => {
                // As hypercore-protocol: the peer's close ends the channel both ways.
                if !self.remote_open.remove(&dk) {
                    return;
                }
                self.local_open.remove(&dk);
                self.input(now, wire, |c, _| c.handle_channel_closed(now, dk), None);
            }
            Wire::Message(dk, message) => {
                // A message for a channel we closed, or never opened, is dropped.
                if !self.local_open.contains(&dk) {
                    return;
                }
                self.input(
                    now,
                    wire,
                    |c, v| c.handle_message(now, dk, message, v.map(|v| v as _)),
                    Some(dk),
                );
            }
        }
    }
}

/// The fake `create_proof`: the block asked for if held, the upgrade asked for if it ends
/// within our length; `None` (NoData) otherwise.
fn serve(feed: &FakeFeed, key: &FeedKey, request: &Request) -> Option<Proof> {
    if !servable(request, feed.length) {
        return None;
    }
    let block = match &request.block {
        Some(block) if feed.has(block.index) => Some(DataBlock {
            index: block.index,
            value: value(key, block.index),
            nodes: Vec::new(),
        }),
        Some(_) => return None,
        None => None,
    };
    let upgrade = request.upgrade.as_ref().map(|upgrade| DataUpgrade {
        start: upgrade.start,
        length: upgrade.length,
        nodes: Vec::new(),
        additional_nodes: Vec::new(),
        signature: vec![0; 64],
    });
    Some(Proof {
        fork: 0,
        block,
        hash: None,
        seek: None,
        upgrade,
    })
}

/// The fake `verify_and_apply_proof`: a block must be its value and below the (new) length,
/// an upgrade must end within the writer's length.
fn apply(feed: &mut FakeFeed, key: &FeedKey, truth: Option<u64>, proof: &Proof) -> Applied {
    let mut length = feed.length;
    if let Some(upgrade) = &proof.upgrade {
        let end = upgrade.start + upgrade.length;
        if truth.is_some_and(|truth| end > truth) || upgrade.start > feed.length {
            return Applied::Invalid("the upgrade claims more than was signed".to_owned());
        }
        length = length.max(end);
    }
    if let Some(block) = &proof.block {
        if block.index >= length || block.value != value(key, block.index) {
            return Applied::Invalid("the block does not verify".to_owned());
        }
    }
    let mut changed = length != feed.length;
    feed.length = length;
    if let Some(block) = &proof.block {
        changed |= feed.blocks.insert(block.index);
    }
    Applied::Verified(changed)
}

/// How the fake wire behaves.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Link {
    /// Base one-way delay.
    pub(crate) latency: Duration,
    /// Up to this much more, seeded (order per direction is kept).
    pub(crate) jitter: Duration,
    /// Chance that an answer (Data) overtakes what was sent before it.
    pub(crate) reorder: f64,
    /// The link breaks after this many deliveries.
    pub(crate) cut_after: Option<usize>,
}

impl Default for Link {
    fn default() -> Self {
        Self {
            latency: Duration::from_millis(20),
            jitter: Duration::from_millis(10),
            reorder: 0.0,
            cut_after: None,
        }
    }
}

struct InFlight {
    at: Instant,
    seq: u64,
    to: usize,
    item: Wire,
}

/// Two peers on a fake link, stepped in virtual time.
pub(crate) struct Pair {
    pub(crate) peers: [Peer; 2],
    pub(crate) now: Instant,
    start: Instant,
    link: Link,
    rng: StdRng,
    in_flight: Vec<InFlight>,
    /// Per direction: when the last in-order item arrives (FIFO).
    last_at: [Instant; 2],
    seq: u64,
    delivered: usize,
    /// The link broke: nothing more crosses it.
    pub(crate) cut: bool,
    /// A muted side hears nothing and does nothing more (a peer that went silent).
    muted: [bool; 2],
    /// One line per step: what happened when (equal for equal seeds).
    pub(crate) trace: Vec<String>,
}

impl Pair {
    /// Two peers holding `feeds` (the writers' lengths are the longest of both).
    pub(crate) fn new(
        configs: [ReplicateConfig; 2],
        feeds: [BTreeMap<FeedKey, FakeFeed>; 2],
        link: Link,
        seed: u64,
    ) -> Self {
        let start = Instant::now();
        let [mut config_a, mut config_b] = configs;
        // The handshake nonces, from the seed (but not the link's draws).
        let mut rng = StdRng::seed_from_u64(!seed);
        config_a.nonce = Some(rng.gen());
        config_b.nonce = Some(rng.gen());
        let [feeds_a, feeds_b] = feeds;
        let mut truth = BTreeMap::new();
        for (key, feed) in feeds_a.iter().chain(feeds_b.iter()) {
            let length = truth.entry(*key).or_insert(0);
            *length = feed.length.max(*length);
        }
        let mut a = Peer::new(config_a, feeds_a, start);
        let mut b = Peer::new(config_b, feeds_b, start);
        a.truth = truth.clone();
        b.truth = truth;
        Self {
            peers: [a, b],
            now: start,
            start,
            link,
            rng: StdRng::seed_from_u64(seed),
            in_flight: Vec::new(),
            last_at: [start; 2],
            seq: 0,
            delivered: 0,
            cut: false,
            muted: [false; 2],
            trace: Vec::new(),
        }
    }

    /// Virtual time since the start.
    pub(crate) fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Both sides complete the Noise handshake (the transport's part, not modelled here).
    pub(crate) fn connect(&mut self) {
        let now = self.now;
        for side in 0..2 {
            let mut wire = Vec::new();
            let remote = [side as u8 + 1; 32];
            self.peers[side].input(now, &mut wire, |c, _| c.handle_handshake(now, remote), None);
            self.send(side, wire);
        }
    }

    fn send(&mut self, from: usize, items: Vec<Wire>) {
        let to = 1 - from;
        for item in items {
            let jitter = if self.link.jitter.is_zero() {
                Duration::ZERO
            } else {
                self.link.jitter.mul_f64(self.rng.gen::<f64>())
            };
            let mut at = self.now + self.link.latency + jitter;
            let answer = matches!(item, Wire::Message(_, Message::Data(_)));
            if answer && self.rng.gen_bool(self.link.reorder) {
                // Overtakes: delivered soon, before what was sent ahead of it.
                at = self.now + self.link.latency / 2;
            } else {
                at = at.max(self.last_at[from]);
                self.last_at[from] = at;
            }
            self.seq += 1;
            self.in_flight.push(InFlight {
                at,
                seq: self.seq,
                to,
                item,
            });
        }
    }

    /// Appends `n` blocks to a feed of `side` (and the writers' length both sides know).
    pub(crate) fn append(&mut self, side: usize, key: FeedKey, n: u64) {
        for peer in &mut self.peers {
            *peer.truth.entry(key).or_insert(0) += n;
        }
        let now = self.now;
        let mut wire = Vec::new();
        self.peers[side].append(key, n, now, &mut wire);
        self.send(side, wire);
    }

    /// Appends as [`append`](Self::append), but the host's change stream lost the change and
    /// says it lagged.
    pub(crate) fn append_lagged(&mut self, side: usize, key: FeedKey, n: u64) {
        for peer in &mut self.peers {
            *peer.truth.entry(key).or_insert(0) += n;
        }
        let now = self.now;
        let mut wire = Vec::new();
        self.peers[side].append_heard(key, n, now, &mut wire, crate::LocalChange::Lagged);
        self.send(side, wire);
    }

    /// Handles the earliest thing due: a delivery or a deadline. False when nothing is left.
    pub(crate) fn step(&mut self) -> bool {
        if self.cut {
            return false;
        }
        let delivery = self
            .in_flight
            .iter()
            .enumerate()
            .min_by_key(|(_, f)| (f.at, f.seq))
            .map(|(i, f)| (f.at, i));
        let deadlines = (0..2).filter_map(|side| {
            let peer = &self.peers[side];
            (!peer.ended() && !self.muted[side])
                .then(|| peer.conn.poll_timeout())
                .flatten()
                .map(|at| (at, side))
        });
        let deadline = deadlines.min();
        let delivery_first = match (delivery, deadline) {
            (None, None) => return false,
            (Some((at, _)), Some((deadline, _))) => at <= deadline,
            (Some(_), None) => true,
            (None, Some(_)) => false,
        };
        if delivery_first {
            let (at, index) = delivery.expect("a delivery");
            let item = self.in_flight.swap_remove(index);
            self.now = self.now.max(at);
            if self.link.cut_after.is_some_and(|cut| self.delivered >= cut) {
                self.cut();
                return false;
            }
            self.delivered += 1;
            if self.muted[item.to] {
                return true;
            }
            self.trace.push(format!(
                "{:?} -> {}: {}",
                self.elapsed(),
                item.to,
                describe(&item.item)
            ));
            let mut wire = Vec::new();
            let now = self.now;
            self.peers[item.to].receive(now, item.item, &mut wire);
            self.send(item.to, wire);
        } else {
            let (at, side) = deadline.expect("a deadline");
            self.now = self.now.max(at);
            self.trace
                .push(format!("{:?} timeout {side}", self.elapsed()));
            let now = self.now;
            let mut wire = Vec::new();
            self.peers[side].input(now, &mut wire, |c, _| c.handle_timeout(now), None);
            self.send(side, wire);
        }
        true
    }

    /// Hands `side` something its peer never sent (a hostile or broken peer), then carries on.
    pub(crate) fn inject(&mut self, side: usize, item: Wire) {
        let now = self.now;
        let mut wire = Vec::new();
        self.peers[side].receive(now, item, &mut wire);
        self.send(side, wire);
    }

    /// Lets virtual time pass without anything arriving, then hands `side` its timeout.
    pub(crate) fn wait(&mut self, side: usize, duration: Duration) {
        self.now += duration;
        let now = self.now;
        let mut wire = Vec::new();
        self.peers[side].input(now, &mut wire, |c, _| c.handle_timeout(now), None);
        self.send(side, wire);
    }

    /// How many items are in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// `side` goes silent: it hears nothing and sends nothing from now on.
    pub(crate) fn mute(&mut self, side: usize) {
        self.muted[side] = true;
    }

    /// The link breaks: nothing in flight arrives. (A side that ended with an error sends
    /// nothing more, but what it sent before still arrives, as over a real connection.)
    pub(crate) fn cut(&mut self) {
        self.cut = true;
        self.in_flight.clear();
    }

    /// Steps until both sides ended or nothing is left, at most `max_steps`; how many it took.
    pub(crate) fn run(&mut self, max_steps: usize) -> usize {
        for steps in 0..max_steps {
            if self.peers.iter().all(Peer::ended) || !self.step() {
                return steps;
            }
        }
        panic!(
            "no end after {max_steps} steps ({:?} virtual); last: {:?}",
            self.elapsed(),
            self.trace.iter().rev().take(10).collect::<Vec<_>>()
        );
    }

    /// Steps for `duration` of virtual time (live replications never end by themselves).
    pub(crate) fn run_for(&mut self, duration: Duration, max_steps: usize) {
        let until = self.now + duration;
        for _ in 0..max_steps {
            let next = self
                .in_flight
                .iter()
                .map(|f| f.at)
                .chain(
                    (0..2)
                        .filter(|&side| !self.muted[side] && !self.peers[side].ended())
                        .filter_map(|side| self.peers[side].conn.poll_timeout()),
                )
                .min();
            if next.is_none_or(|next| next > until) || !self.step() {
                self.now = self.now.max(until);
                return;
            }
        }
        panic!("more than {max_steps} steps in {duration:?}");
    }
}

fn describe(item: &Wire) -> String {
    match item {
        Wire::Open(dk) => format!("open {:02x}", dk[0]),
        Wire::Close(dk) => format!("close {:02x}", dk[0]),
        Wire::Message(dk, message) => {
            let what = match message {
                Message::Request(r) => format!(
                    "request {} block {:?} upgrade {:?}",
                    r.id,
                    r.block.as_ref().map(|b| b.index),
                    r.upgrade.as_ref().map(|u| (u.start, u.length))
                ),
                Message::Data(d) => format!(
                    "data {} block {:?}",
                    d.request,
                    d.block.as_ref().map(|b| b.index)
                ),
                Message::Extension(e) => {
                    format!("extension {} ({} bytes)", e.name, e.message.len())
                }
                other => format!("{other:?}"),
            };
            format!("{:02x} {what}", dk[0])
        }
    }
}
