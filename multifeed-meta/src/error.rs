//! Errors of the meta exchange, with the JS multifeed error codes.

/// Why received bytes are not a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The message has no bytes.
    #[error("empty message")]
    Empty,
    /// The message is longer than [`MAX_MESSAGE_BYTES`](crate::MAX_MESSAGE_BYTES).
    #[error("message of {len} bytes exceeds the limit of {limit}")]
    MessageTooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The type byte names no message.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// The message ends inside a field.
    #[error("message ends inside `{0}`")]
    Truncated(&'static str),
    /// A varint does not fit 64 bits.
    #[error("varint in `{0}` overflows 64 bits")]
    VarintOverflow(&'static str),
    /// A field is longer than its limit.
    #[error("`{field}` is {len} bytes long; the limit is {limit}")]
    FieldTooLong {
        /// The field.
        field: &'static str,
        /// Its length.
        len: u64,
        /// The limit.
        limit: usize,
    },
    /// More keys than [`MAX_KEYS_PER_MESSAGE`](crate::MAX_KEYS_PER_MESSAGE).
    #[error("{count} keys in one message; the limit is {limit}")]
    TooManyKeys {
        /// How many the message claims.
        count: u64,
        /// The limit.
        limit: usize,
    },
    /// The same key twice in one message.
    #[error("duplicate key in one message")]
    DuplicateKey,
    /// A text field is not UTF-8.
    #[error("`{0}` is not valid UTF-8")]
    InvalidUtf8(&'static str),
    /// The version is not semver.
    #[error("version `{0}` is not a semantic version")]
    InvalidVersion(String),
    /// A flag byte is neither 0 nor 1.
    #[error("invalid flag in `{0}`")]
    InvalidFlag(&'static str),
    /// Bytes follow the end of the message.
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
}

impl DecodeError {
    /// The JS multifeed code of a message that does not decode (as [`MetaError::Decode`] has).
    pub fn code(&self) -> &'static str {
        "ERR_MALFORMED_MESSAGE"
    }
}

/// What ends a meta exchange.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MetaError {
    /// The peer speaks an incompatible protocol version.
    #[error("protocol version mismatch: ours {ours}, theirs {theirs}")]
    VersionMismatch {
        /// Our version.
        ours: semver::Version,
        /// Theirs.
        theirs: semver::Version,
    },
    /// The peer is another kind of client.
    #[error("client mismatch: ours {ours}, theirs {theirs}")]
    ClientMismatch {
        /// Our client name.
        ours: String,
        /// Theirs.
        theirs: String,
    },
    /// The peer does not know our shared exchange key.
    #[error("exchange key did not match")]
    KeyMismatch,
    /// The peer offered more feeds than we accept from one connection.
    #[error("the peer offered more than {limit} feeds")]
    TooManyFeeds {
        /// The limit.
        limit: usize,
    },
    /// A message that the exchange does not allow in its current state.
    #[error("unexpected {message} in state {state}")]
    UnexpectedMessage {
        /// The exchange's state.
        state: &'static str,
        /// The message received.
        message: &'static str,
    },
    /// Received bytes are not a valid message.
    #[error("malformed message: {0}")]
    Decode(#[from] DecodeError),
    /// A reconciliation message that negentropy cannot take, or a reconciliation that does
    /// not end.
    #[error("set reconciliation failed: {reason}")]
    Reconcile {
        /// What was wrong.
        reason: &'static str,
    },
}

impl MetaError {
    /// The error code, as JS multifeed names it where it has one.
    pub fn code(&self) -> &'static str {
        match self {
            Self::VersionMismatch { .. } => "ERR_VERSION_MISMATCH",
            Self::ClientMismatch { .. } => "ERR_CLIENT_MISMATCH",
            Self::KeyMismatch => "ERR_KEY_MISMATCH",
            Self::TooManyFeeds { .. } => "ERR_TOO_MANY_FEEDS",
            Self::UnexpectedMessage { .. } => "ERR_UNEXPECTED_MESSAGE",
            Self::Decode(_) | Self::Reconcile { .. } => "ERR_MALFORMED_MESSAGE",
        }
    }
}
