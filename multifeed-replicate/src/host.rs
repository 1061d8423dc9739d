//! What the replication driver needs from the multifeed that owns the feeds.

use async_trait::async_trait;
use multifeed_storage::{FeedKey, SharedCore};

/// The error a [`FeedHost`] reports; the driver wraps it in its own error.
pub type HostError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A feed the host holds, with its current length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalFeed {
    /// The feed's public key.
    pub key: FeedKey,
    /// The feed's length now.
    pub length: u64,
    /// The entries held from 0 without a gap (`length` when every entry is here). A non-live
    /// replication asks a peer only for feeds it lacks, that are longer there, or that are
    /// not complete here.
    pub contiguous_length: u64,
    /// Its discovery key, if the host keeps it (`None`: the replication computes it, a keyed
    /// BLAKE2b per feed and connection).
    pub discovery_key: Option<[u8; 32]>,
}

/// A change to the host's feeds, as [`FeedHost::subscribe_changes`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalChange {
    /// This feed got new entries or blocks (an append, or blocks stored by any connection).
    Feed(FeedKey),
    /// Changes may have been missed (the host's queue overflowed): any feed may have changed.
    /// A live replication then lists the host's feeds and compares.
    Lagged,
}

/// The set of feeds a replication runs against (implemented by the `multifeed` facade).
///
/// All methods may be called concurrently from several connections.
#[async_trait]
pub trait FeedHost: Send + Sync + 'static {
    /// Every feed the host holds now, in a stable order (offer filtering is done by the driver).
    async fn local_feeds(&self) -> Result<Vec<LocalFeed>, HostError>;

    /// Opens (lazily) the hypercore of a feed the host holds; `None` if it holds no such feed.
    async fn open_feed(&self, key: &FeedKey) -> Result<Option<SharedCore>, HostError>;

    /// Adds a feed learned from a remote (read-only, empty), or returns the existing one.
    async fn add_remote_feed(&self, key: &FeedKey) -> Result<SharedCore, HostError>;

    /// A stream of keys of feeds added to the host after this call (local writers created, or
    /// feeds learned from other connections), for live replication to offer them.
    fn subscribe_new_feeds(&self) -> futures::stream::BoxStream<'static, FeedKey>;

    /// A stream of changes to the host's feeds after this call: every append and every batch
    /// of blocks stored, by any connection, or [`LocalChange::Lagged`] when some may have been
    /// missed. A live replication closes the channels of idle feeds and lets their hypercores
    /// go; this is how it hears that one of them has news and opens its channel again. A
    /// change may be reported more than once; it must not be lost.
    fn subscribe_changes(&self) -> futures::stream::BoxStream<'static, LocalChange>;

    /// A live connection let go of the cores of feeds whose channels closed idle: a host that
    /// bounds its open cores may close idle ones now. The default does nothing.
    fn cores_released(&self) {}

    /// Called after a batch of received blocks was stored (before each new burst of requests,
    /// and when the connection ends). A host that promises durability across power loss makes
    /// them durable here (fsync); the default does nothing.
    async fn blocks_stored(&self) -> Result<(), HostError> {
        Ok(())
    }

    /// Whether `value`, about to be served as block `index` of `key`, is what the feed's tree
    /// records for it. A host that can tell drops a damaged block (so it is fetched again) and
    /// says false; the peer then gets NoData instead of a proof it would reject. The default
    /// trusts every block.
    async fn block_intact(&self, key: &FeedKey, index: u64, value: &[u8]) -> bool {
        let _ = (key, index, value);
        true
    }
}
