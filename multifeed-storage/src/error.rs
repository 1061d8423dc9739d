//! The storage error type.

use random_access_storage::RandomAccessError;

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
    #[error("feed {key} is listed but its namespace `{namespace}` is missing")]
    FeedMissing {
        /// Hex key of the feed.
        key: String,
        /// Its namespace inside the root.
        namespace: String,
    },
    /// The feed's namespace exists but hypercore cannot open it.
    #[error("feed {key} in namespace `{namespace}` is corrupt: {reason}")]
    FeedCorrupt {
        /// Hex key of the feed.
        key: String,
        /// Its namespace inside the root.
        namespace: String,
        /// What hypercore reported.
        reason: String,
    },
    /// The feed's stored key is not the key the index lists for it.
    #[error("namespace `{namespace}` holds feed {found}, but the index lists {expected}")]
    FeedKeyMismatch {
        /// Its namespace inside the root.
        namespace: String,
        /// Hex key the index lists.
        expected: String,
        /// Hex key stored in the namespace.
        found: String,
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
    #[error("feed {key} is already stored")]
    DuplicateFeed {
        /// Hex key of the feed.
        key: String,
    },
}

impl StorageError {
    pub(crate) fn io(path: &str, source: RandomAccessError) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}
