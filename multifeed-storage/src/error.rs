//! The storage error type.

use random_access_storage::RandomAccessError;

use crate::FeedKey;

/// What went wrong in the storage layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// A read or write of a stored file failed.
    #[error("storage I/O failed at `{path}`: {source}")]
    Io {
        /// Path of the file inside the root.
        path: String,
        /// What the backend reported.
        #[source]
        source: RandomAccessError,
    },
    /// The feed is listed in the index but its namespace holds no data (deleted or never written).
    #[error("feed {key_hex} is listed but its namespace `{namespace}` is missing", key_hex = hex::encode(.key))]
    FeedMissing {
        /// Key of the feed.
        key: FeedKey,
        /// Its namespace inside the root.
        namespace: String,
    },
    /// The feed's namespace exists but hypercore cannot open it.
    #[error("feed {key_hex} in namespace `{namespace}` is corrupt: {reason}", key_hex = hex::encode(.key))]
    FeedCorrupt {
        /// Key of the feed.
        key: FeedKey,
        /// Its namespace inside the root.
        namespace: String,
        /// What hypercore reported.
        reason: String,
    },
    /// The feed's stored key is not the key the index lists for it.
    #[error("namespace `{namespace}` holds feed {found_hex}, but the index lists {expected_hex}", expected_hex = hex::encode(.expected), found_hex = hex::encode(.found))]
    FeedKeyMismatch {
        /// Its namespace inside the root.
        namespace: String,
        /// Key the index lists.
        expected: FeedKey,
        /// Key stored in the namespace.
        found: FeedKey,
    },
    /// A hypercore operation failed.
    #[error("hypercore error in `{namespace}`: {source}")]
    Hypercore {
        /// Namespace of the feed.
        namespace: String,
        /// What hypercore reported.
        #[source]
        source: hypercore::HypercoreError,
    },
    /// A writer name is longer than [`MAX_NAME_LEN`](crate::MAX_NAME_LEN) bytes.
    #[error("writer name is {len} bytes long; the limit is {limit}")]
    NameTooLong {
        /// Length of the name given.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The index already lists this feed key.
    #[error("feed {key_hex} is already stored", key_hex = hex::encode(.key))]
    DuplicateFeed {
        /// Key of the feed.
        key: FeedKey,
    },
}

impl StorageError {
    /// A stable code for programs and logs (`ERR_…`), as the replication errors have.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Io { .. } => "ERR_IO",
            Self::FeedMissing { .. } => "ERR_FEED_MISSING",
            Self::FeedCorrupt { .. } => "ERR_FEED_CORRUPT",
            Self::FeedKeyMismatch { .. } => "ERR_FEED_KEY_MISMATCH",
            Self::Hypercore { .. } => "ERR_HYPERCORE",
            Self::NameTooLong { .. } => "ERR_NAME_TOO_LONG",
            Self::DuplicateFeed { .. } => "ERR_DUPLICATE_FEED",
        }
    }

    pub(crate) fn io(path: &str, source: RandomAccessError) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}
