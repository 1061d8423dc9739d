//! Events a multifeed reports: feeds added, replication progress.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use multifeed_storage::{FeedKey, FeedOrigin};

/// Something that happened to a multifeed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A feed was added: a local writer was created, or a feed was learned from a peer.
    Feed {
        /// The feed's public key.
        key: FeedKey,
        /// Its local writer name, if any.
        name: Option<String>,
        /// Whether it is ours or a peer's.
        origin: FeedOrigin,
    },
    /// The peer's feeds are known on a connection: the ones we download from it. Emitted on
    /// both sides once the peer's first round of offers is settled (with no keys when we
    /// download nothing, as when both sides are empty), then for each later batch (live).
    RemoteFeeds {
        /// Keys of the feeds we download.
        keys: Vec<FeedKey>,
    },
    /// A feed of ours could not be opened for a replication (damaged or missing): the
    /// replication went on without it.
    FeedUnavailable {
        /// Its key.
        key: FeedKey,
        /// Why.
        reason: String,
    },
    /// A block read did not match the feed's tree: it was dropped, to be fetched again.
    BlockDamaged {
        /// The feed.
        key: FeedKey,
        /// The block.
        index: u64,
    },
    /// Entries were appended to a local writer (one event per append or batch).
    Appended {
        /// The feed.
        key: FeedKey,
        /// Their indexes.
        range: std::ops::Range<u64>,
    },
    /// Entries of a feed arrived from a peer (one event per feed per burst of blocks, never
    /// per block).
    Downloaded {
        /// The feed.
        key: FeedKey,
        /// From the lowest to past the highest index stored (sparse when `blocks` is smaller).
        range: std::ops::Range<u64>,
        /// How many entries were stored.
        blocks: u64,
        /// The replication they came from (the number in its `PeerConnected`).
        connection: u64,
    },
    /// A peer completed the multifeed handshake on a replication.
    PeerConnected {
        /// This multifeed's number for the replication (the same in its `PeerDisconnected`).
        connection: u64,
        /// The peer's handshake data (`ReplicateOptions::user_data` on its side).
        user_data: Vec<u8>,
        /// The peer's Noise static public key.
        remote_key: [u8; 32],
    },
    /// A live replication caught up: both sides hold the same length of every feed they
    /// agreed on, complete. Reported again each time they catch up after a change (JS
    /// multifeed has no such signal).
    Synced {
        /// The replication (the number in its `PeerConnected`).
        connection: u64,
    },
    /// A replication that reported `PeerConnected` ended.
    PeerDisconnected {
        /// The replication's number.
        connection: u64,
        /// Why, if it failed (the error's text); `None` when it finished or was stopped.
        error: Option<String>,
    },
    /// Replication progress on a connection, for progress bars.
    Progress {
        /// Blocks transferred so far.
        blocks_done: u64,
        /// Blocks known to need transfer.
        blocks_known: u64,
    },
    /// A feed learned from a peer could not be read after a crash and was started again empty;
    /// replication fetches its entries anew. Local feeds are restored instead
    /// ([`FeedRestored`](Event::FeedRestored)).
    FeedReset {
        /// The feed's key.
        key: FeedKey,
        /// What was wrong with its files.
        reason: String,
    },
    /// A local feed whose files could not be opened (a lost or damaged oplog or tree) was
    /// started again, empty, under its key; its old files are kept in its folder's `damaged/`.
    /// Replication brings its entries back from peers that hold them. It can append again
    /// (if its secret key was found) once it holds its old signed length
    /// ([`Error::Restoring`](crate::Error::Restoring) until then).
    FeedRestored {
        /// The feed's key.
        key: FeedKey,
        /// What was wrong with its files.
        reason: String,
        /// Whether its secret key was found: false leaves it read-only.
        writable: bool,
        /// The length it had signed, if its header said.
        signed_length: Option<u64>,
    },
    /// A feed was removed ([`Multifeed::remove_feed`](crate::Multifeed::remove_feed)).
    FeedRemoved {
        /// The feed's key.
        key: FeedKey,
    },
    /// The subscriber fell behind and `missed` events were dropped; re-read [`feeds`](crate::Multifeed::feeds).
    Lagged {
        /// How many events were dropped.
        missed: u64,
    },
}

/// A stream of [`Event`]s, from [`Multifeed::events`](crate::Multifeed::events).
///
/// Each subscriber has a bounded buffer; a subscriber that falls behind gets [`Event::Lagged`].
#[derive(Debug)]
pub struct Events {
    pub(crate) receiver: async_broadcast::Receiver<Event>,
}

impl Stream for Events {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        match Pin::new(&mut self.receiver).poll_recv(cx) {
            Poll::Ready(Some(Ok(event))) => Poll::Ready(Some(event)),
            Poll::Ready(Some(Err(async_broadcast::RecvError::Overflowed(missed)))) => {
                Poll::Ready(Some(Event::Lagged { missed }))
            }
            Poll::Ready(Some(Err(async_broadcast::RecvError::Closed))) | Poll::Ready(None) => {
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
