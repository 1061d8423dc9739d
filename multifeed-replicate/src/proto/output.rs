//! What the core hands its owner to carry out, and the facts the owner hands back.

use hypercore_protocol::schema::Request;
use hypercore_protocol::Message;
use hypercore_schema::Proof;
use hypercore_schema::RequestUpgrade;
use multifeed_storage::FeedKey;

use super::{DiscoveryKey, FeedInfo, FeedView};
use crate::proto::sync::Asked;
use crate::ReplicationEvent;

/// One thing for the owner to do, in order.
#[derive(Debug)]
pub(crate) enum Output {
    /// Send these messages on channel `dk` (dropped if it is closed by then).
    Send {
        dk: DiscoveryKey,
        messages: Vec<Message>,
    },
    /// Ask for blocks or an upgrade on channel `dk`; a block whose `nodes` is `None` asks for
    /// the tree nodes the feed lacks to verify it (hypercore's `missing_nodes`).
    Request {
        dk: DiscoveryKey,
        id: u64,
        fork: u64,
        block: Option<(u64, Option<u64>)>,
        upgrade: Option<RequestUpgrade>,
    },
    /// Open our side of the channel of this key (writing what was sent before first).
    OpenChannel(FeedKey),
    /// Close our side of channel `dk` (writing what was sent before first).
    CloseChannel(DiscoveryKey),
    /// Answer with [`Connection::handle_local_feeds`](super::Connection::handle_local_feeds).
    ListLocalFeeds,
    /// Open a feed: answer with [`Connection::handle_feed_opened`](super::Connection::handle_feed_opened)
    /// (a feed tracked already answers from the owner's own handle, without the host).
    OpenFeed(OpenFeed),
    /// Create an in-memory probe for a feed new to us, then answer `handle_feed_opened` with
    /// [`Opened::Probe`].
    CreateProbe(OpenFeed),
    /// Forget the feed of `dk` (its probe is dropped).
    DropFeed(DiscoveryKey),
    /// Answer a request with a proof: answer with
    /// [`Connection::handle_served`](super::Connection::handle_served).
    Serve { dk: DiscoveryKey, request: Request },
    /// Verify and apply a proof: answer with
    /// [`Connection::handle_applied`](super::Connection::handle_applied).
    Apply { applying: Applying, proof: Proof },
    /// A probe's first signed root verified: the host records the feed, the proof is applied
    /// to the host's feed too, and the feed goes on there (a failure ends the connection).
    Promote {
        dk: DiscoveryKey,
        key: FeedKey,
        proof: Proof,
    },
    /// A feed's announcement waited for the transport: answer with
    /// [`Connection::handle_announce`](super::Connection::handle_announce) and its view.
    Announce(DiscoveryKey),
    /// Our copy of the feed of `dk` changed: wake whoever waits for it.
    NotifyChanged(DiscoveryKey),
    /// Blocks were stored since the last time: let the host make them durable.
    SyncBlocks,
    /// Report this to the application.
    Event(ReplicationEvent),
}

/// The request message for an [`Output::Request`] whose node count is known (`nodes`).
pub(crate) fn request(
    id: u64,
    fork: u64,
    block: Option<(u64, u64)>,
    upgrade: Option<RequestUpgrade>,
) -> Request {
    Request {
        id,
        fork,
        hash: None,
        block: block.map(|(index, nodes)| hypercore_schema::RequestBlock { index, nodes }),
        seek: None,
        upgrade,
        manifest: false,
        priority: 0,
    }
}

/// A feed the core asks to open, and why (handed back with the answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OpenFeed {
    pub(crate) key: FeedKey,
    pub(crate) purpose: Purpose,
}

/// Why a feed is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// To replicate it on this connection; `create` makes a probe if the host lacks it.
    Track { target: Option<u64>, create: bool },
    /// To offer it to the peer (a feed added to the host while live).
    Offer,
}

/// What opening a feed found.
pub(crate) enum Opened<'a> {
    /// The host holds it.
    Held(&'a dyn FeedView),
    /// A probe was created for it.
    Probe(&'a dyn FeedView),
    /// The host does not hold it.
    Missing,
    /// The host could not open it (the reason is reported, the replication goes on).
    Unavailable(String),
}

/// What the local feed list is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LocalFeedsFor {
    /// Offers at the start of the exchange.
    Exchange,
    /// Plain mode: the discovery keys we may serve, before the plain feeds are tracked.
    PlainStart,
    /// The peer opened this channel: which local feed it is, if any.
    PeerOpened(DiscoveryKey),
    /// Live: the host's changes may have been missed; which idle feeds whose channels we
    /// closed have news.
    Recheck,
}

/// A proof being applied: what the core needs to continue (handed back with the result).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Applying {
    pub(crate) dk: DiscoveryKey,
    pub(crate) asked: Asked,
    pub(crate) block_bytes: Option<u64>,
    pub(crate) had_block: bool,
    pub(crate) before: FeedInfo,
    pub(crate) probe: bool,
}

impl Applying {
    /// The block asked for, if any.
    pub(crate) fn asked_block(&self) -> Option<u64> {
        match self.asked {
            Asked::Block(index) | Asked::UpgradeAndBlock(index) => Some(index),
            Asked::Upgrade => None,
        }
    }
}
