//! The facade's error type.

use multifeed_storage::{FeedKey, StorageError};

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
    #[error("feed {key_hex}: {source}", key_hex = hex::encode(.key))]
    Hypercore {
        /// Key of the feed.
        key: FeedKey,
        /// What hypercore reported.
        #[source]
        source: hypercore::HypercoreError,
    },
    /// An append to a feed that this multifeed cannot write (learned from a peer).
    #[error("feed {key_hex} is not writable here", key_hex = hex::encode(.key))]
    NotWritable {
        /// Key of the feed.
        key: FeedKey,
    },
    /// An append to a local feed restored after its files were lost, before it holds its old
    /// signed length again: appending now would sign a second history of the feed, which its
    /// peers refuse. A sync with a peer that holds the feed brings the entries back.
    #[error(
        "local feed {key_hex} was restored with {length} of its {signed_length} signed entries; \
         sync it with a peer that holds them before appending"
    , key_hex = hex::encode(.key))]
    Restoring {
        /// Key of the feed.
        key: FeedKey,
        /// The entries it holds now.
        length: u64,
        /// The length it had signed before it was restored.
        signed_length: u64,
    },
    /// [`Multifeed::remove_feed`](crate::Multifeed::remove_feed) of a local writer: removing
    /// one's own feed deletes its secret key, so it takes
    /// [`remove_writer`](crate::Multifeed::remove_writer).
    #[error("feed {key_hex} is a local writer; remove it with remove_writer", key_hex = hex::encode(.key))]
    LocalWriter {
        /// Key of the feed.
        key: FeedKey,
    },
    /// A feed under a denied or removed key was to be added
    /// ([`Multifeed::deny`](crate::Multifeed::deny), [`allow`](crate::Multifeed::allow) lifts it).
    #[error("feed {key_hex} is denied or removed here", key_hex = hex::encode(.key))]
    Denied {
        /// Key of the feed.
        key: FeedKey,
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
    #[error("entry {index} of feed {key_hex} is not valid {encoding}: {reason}", key_hex = hex::encode(.key))]
    Decode {
        /// Key of the feed.
        key: FeedKey,
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
    #[error("block {index} of feed {key_hex} is damaged; it was dropped, to be fetched again", key_hex = hex::encode(.key))]
    DamagedBlock {
        /// Key of the feed.
        key: FeedKey,
        /// The block.
        index: u64,
    },
    /// A block of a local writer, below its length, is not stored (its bitfield or data was
    /// damaged, or the block was dropped as damaged). A sync with a peer that holds the feed
    /// restores it.
    #[error("block {index} of local feed {key_hex} is missing; a sync with a peer restores it", key_hex = hex::encode(.key))]
    MissingBlock {
        /// Key of the feed.
        key: FeedKey,
        /// The block.
        index: u64,
    },
    /// What [`Feed::wait_for_len`](crate::Feed::wait_for_len) or
    /// [`Feed::get_or_wait`](crate::Feed::get_or_wait) waited for did not happen in time.
    #[error("feed {key_hex}: {waited_for} did not arrive within {timeout:?}", key_hex = hex::encode(.key))]
    WaitTimedOut {
        /// Key of the feed.
        key: FeedKey,
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
    /// A stable code for programs and logs (`ERR_…`): the inner error's own code for storage
    /// and replication errors (`ERR_KEY_MISMATCH`, `ERR_TIMEOUT`, …).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Closed => "ERR_CLOSED",
            Self::Storage(err) => err.code(),
            Self::Hypercore { .. } => "ERR_HYPERCORE",
            Self::NotWritable { .. } => "ERR_NOT_WRITABLE",
            Self::Restoring { .. } => "ERR_RESTORING",
            Self::LocalWriter { .. } => "ERR_LOCAL_WRITER",
            Self::Denied { .. } => "ERR_DENIED",
            Self::InvalidKey { .. } => "ERR_INVALID_KEY",
            Self::AlreadyExists { .. } => "ERR_ALREADY_EXISTS",
            Self::EncodingMismatch { .. } => "ERR_ENCODING_MISMATCH",
            Self::Decode { .. } => "ERR_DECODE",
            Self::Encode(_) => "ERR_ENCODE",
            Self::TooManyFeeds { .. } => "ERR_TOO_MANY_FEEDS",
            Self::Locked { .. } => "ERR_LOCKED",
            Self::LockFailed { .. } => "ERR_LOCK_FAILED",
            Self::DamagedBlock { .. } => "ERR_DAMAGED_BLOCK",
            Self::MissingBlock { .. } => "ERR_MISSING_BLOCK",
            Self::WaitTimedOut { .. } => "ERR_WAIT_TIMEOUT",
            Self::Replicate(err) => err.code(),
        }
    }

    pub(crate) fn hypercore(key: &[u8; 32], source: hypercore::HypercoreError) -> Self {
        Self::Hypercore { key: *key, source }
    }
}
