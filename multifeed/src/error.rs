//! The facade's error type.

use multifeed_storage::StorageError;

/// What went wrong in a multifeed operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The multifeed was closed; no further use is possible.
    #[error("the multifeed is closed")]
    Closed,
    /// Storage failed (index, namespaces, files).
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A hypercore operation on a feed failed.
    #[error("feed {key}: {source}")]
    Hypercore {
        /// Hex key of the feed.
        key: String,
        /// What hypercore reported.
        #[source]
        source: hypercore::HypercoreError,
    },
    /// An append to a feed that this multifeed cannot write (learned from a peer).
    #[error("feed {key} is not writable here")]
    NotWritable {
        /// Hex key of the feed.
        key: String,
    },
    /// An append to a local feed restored after its files were lost, before it holds its old
    /// signed length again: appending now would sign a second history of the feed, which its
    /// peers refuse. A sync with a peer that holds the feed brings the entries back.
    #[error(
        "local feed {key} was restored with {length} of its {signed_length} signed entries; \
         sync it with a peer that holds them before appending"
    )]
    Restoring {
        /// Hex key of the feed.
        key: String,
        /// The entries it holds now.
        length: u64,
        /// The length it had signed before it was restored.
        signed_length: u64,
    },
    /// [`Multifeed::remove_feed`](crate::Multifeed::remove_feed) of a local writer: removing
    /// one's own feed deletes its secret key, so it takes
    /// [`remove_writer`](crate::Multifeed::remove_writer).
    #[error("feed {key} is a local writer; remove it with remove_writer")]
    LocalWriter {
        /// Hex key of the feed.
        key: String,
    },
    /// A feed under a denied or removed key was to be added
    /// ([`Multifeed::deny`](crate::Multifeed::deny), [`allow`](crate::Multifeed::allow) lifts it).
    #[error("feed {key} is denied or removed here")]
    Denied {
        /// Hex key of the feed.
        key: String,
    },
    /// A key given by the caller is not 32 bytes nor 64 hex characters.
    #[error("invalid feed key `{input}`: {reason}")]
    InvalidKey {
        /// The input, shortened for display.
        input: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A name is already used by another feed, or a key pair belongs to an existing feed.
    #[error("{what} already exists")]
    AlreadyExists {
        /// What exists already.
        what: String,
    },
    /// A value does not fit the multifeed's value encoding.
    #[error("value encoding is {expected}, but the value is {found}")]
    EncodingMismatch {
        /// The multifeed's encoding.
        expected: &'static str,
        /// What was given.
        found: &'static str,
    },
    /// A stored entry could not be decoded with the value encoding.
    #[error("entry {index} of feed {key} is not valid {encoding}: {reason}")]
    Decode {
        /// Hex key of the feed.
        key: String,
        /// Index of the entry.
        index: u64,
        /// The encoding tried.
        encoding: &'static str,
        /// Why decoding failed.
        reason: String,
    },
    /// A value could not be encoded as JSON.
    #[error("value cannot be encoded as JSON: {0}")]
    Encode(#[source] serde_json::Error),
    /// The store already keeps as many feeds learned from peers as it may
    /// ([`MultifeedBuilder::max_remote_feeds`](crate::MultifeedBuilder::max_remote_feeds)).
    #[error("the store keeps {limit} feeds learned from peers, its limit")]
    TooManyFeeds {
        /// The limit.
        limit: usize,
    },
    /// The disk root is open already, in this process or another (its `LOCK` is held).
    #[error("the multifeed at {} is open elsewhere", path.display())]
    Locked {
        /// The root directory.
        path: std::path::PathBuf,
    },
    /// The disk root's directory or `LOCK` file could not be created or locked.
    #[error("cannot lock the multifeed at {}: {source}", path.display())]
    LockFailed {
        /// The root directory.
        path: std::path::PathBuf,
        /// What the file system reported.
        #[source]
        source: std::io::Error,
    },
    /// A stored block does not match its feed's tree (its bytes were damaged on disk). It was
    /// dropped; a sync with a peer that holds the feed fetches it again.
    #[error("block {index} of feed {key} is damaged; it was dropped, to be fetched again")]
    DamagedBlock {
        /// Hex key of the feed.
        key: String,
        /// The block.
        index: u64,
    },
    /// A block of a local writer, below its length, is not stored (its bitfield or data was
    /// damaged, or the block was dropped as damaged). A sync with a peer that holds the feed
    /// restores it.
    #[error("block {index} of local feed {key} is missing; a sync with a peer restores it")]
    MissingBlock {
        /// Hex key of the feed.
        key: String,
        /// The block.
        index: u64,
    },
    /// What [`Feed::wait_for_len`](crate::Feed::wait_for_len) or
    /// [`Feed::get_or_wait`](crate::Feed::get_or_wait) waited for did not happen in time.
    #[error("feed {key}: {waited_for} did not arrive within {timeout:?}")]
    WaitTimedOut {
        /// Hex key of the feed.
        key: String,
        /// What was waited for.
        waited_for: String,
        /// How long.
        timeout: std::time::Duration,
    },
    /// Replication failed.
    #[error(transparent)]
    Replicate(#[from] multifeed_replicate::ReplicateError),
}

impl Error {
    pub(crate) fn hypercore(key: &[u8; 32], source: hypercore::HypercoreError) -> Self {
        Self::Hypercore {
            key: hex::encode(key),
            source,
        }
    }
}
