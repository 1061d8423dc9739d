//! The replication error type.

use multifeed_meta::MetaError;
use multifeed_storage::FeedKey;

use crate::HostError;

/// What ended a replication.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicateError {
    /// The meta exchange failed (version or client mismatch, malformed or unexpected message).
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// The peer does not know our shared key: it opened a channel we cannot match.
    #[error("exchange key did not match")]
    KeyMismatch,
    /// The connection failed or the peer closed it.
    #[error("connection failed during {phase}: {source}")]
    Io {
        /// What the replication was doing.
        phase: Phase,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A proof from the peer did not verify: the peer is buggy or lying.
    #[error("invalid proof from the peer for feed {key_hex}: {reason}", key_hex = hex::encode(.key))]
    InvalidProof {
        /// Key of the feed.
        key: FeedKey,
        /// Why it failed.
        reason: String,
    },
    /// A hypercore operation on our side failed.
    #[error("hypercore error on feed {key_hex}: {source}", key_hex = hex::encode(.key))]
    Hypercore {
        /// Key of the feed.
        key: FeedKey,
        /// What hypercore reported.
        #[source]
        source: hypercore::HypercoreError,
    },
    /// The multifeed that owns the feeds failed.
    #[error("feed host error: {0}")]
    Host(#[source] HostError),
    /// Nothing arrived from the peer in time.
    #[error("timed out during {phase}")]
    Timeout {
        /// What the replication was waiting for.
        phase: Phase,
    },
    /// The peer sent what no honest peer sends, or more than a peer may: the connection ended
    /// before it could crash, stall or bloat us.
    #[error("the peer broke the protocol during {phase}: {violation}")]
    Peer {
        /// What the replication was doing.
        phase: Phase,
        /// What the peer did.
        #[source]
        violation: PeerViolation,
    },
}

/// What a replication was doing when it ended with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Phase {
    /// The Noise handshake that sets up the encrypted connection.
    NoiseHandshake,
    /// The multifeed handshake (version, client, shared key) on the root channel.
    ExchangeHandshake,
    /// Exchanging feed sets and syncing feeds.
    Replication,
    /// A live replication waiting for news, kept open by keep-alives.
    LiveKeepAlive,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::NoiseHandshake => "noise handshake",
            Self::ExchangeHandshake => "exchange handshake",
            Self::Replication => "replication",
            Self::LiveKeepAlive => "live keep-alive",
        })
    }
}

/// What a hostile or broken peer did (see [`ReplicateError::Peer`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerViolation {
    /// A frame that does not decode as the Hypercore 10 wire protocol.
    #[error("malformed frame: {what}")]
    Malformed {
        /// What was wrong with it.
        what: &'static str,
    },
    /// An Open with a channel id far past any the peer could have allocated.
    #[error("channel id {id} is past the bound {bound}")]
    ChannelId {
        /// The id it sent.
        id: u64,
        /// The largest id it could have had.
        bound: u64,
    },
    /// The peer holds more channels open than we allow.
    #[error("the peer opened more than {limit} channels")]
    TooManyChannels {
        /// The limit ([`ReplicateConfig::max_channels`](crate::ReplicateConfig::max_channels)).
        limit: usize,
    },
    /// The peer opened channels for feeds we did not agree to replicate.
    #[error("the peer opened more than {limit} channels we did not agree to")]
    UnknownChannels {
        /// The limit.
        limit: usize,
    },
    /// A frame larger than a handshake message before the Noise handshake completed.
    #[error("a frame of {len} bytes before the handshake completed; the limit is {limit}")]
    HandshakeFrame {
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// More of the peer's requests wait to be answered than we queue.
    #[error("more than {limit} of the peer's requests wait to be answered")]
    TooManyRequests {
        /// The limit ([`ReplicateConfig::max_queued_requests`](crate::ReplicateConfig::max_queued_requests)).
        limit: usize,
    },
    /// The peer answered our requests for a feed many times without a block or length we lack.
    #[error("no progress on feed {key_hex} after {answers} answers", key_hex = hex::encode(.key))]
    NoProgress {
        /// Key of the feed.
        key: FeedKey,
        /// Answers in a row that brought nothing.
        answers: u32,
    },
    /// `hypercore-protocol` panicked on the peer's input (contained; a bug there or here).
    #[error("hypercore-protocol panicked on the peer's input")]
    ProtocolPanic,
}

impl PeerViolation {
    /// The error code: `ERR_MALFORMED_MESSAGE`, `ERR_PEER_LIMIT` or `ERR_NO_PROGRESS`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed { .. } | Self::ChannelId { .. } | Self::ProtocolPanic => {
                "ERR_MALFORMED_MESSAGE"
            }
            Self::TooManyChannels { .. }
            | Self::UnknownChannels { .. }
            | Self::HandshakeFrame { .. }
            | Self::TooManyRequests { .. } => "ERR_PEER_LIMIT",
            Self::NoProgress { .. } => "ERR_NO_PROGRESS",
        }
    }

    /// Carries the violation through the `io::Error` of the transport.
    pub(crate) fn into_io(self) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, self)
    }

    /// The violation an `io::Error` from the transport carries, if any.
    pub(crate) fn from_io(err: &std::io::Error) -> Option<&Self> {
        err.get_ref().and_then(|inner| inner.downcast_ref::<Self>())
    }
}

impl ReplicateError {
    /// The error code, as JS multifeed names it where it has one.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Meta(meta) => meta.code(),
            Self::KeyMismatch => "ERR_KEY_MISMATCH",
            Self::Io { .. } => "ERR_CONNECTION",
            Self::InvalidProof { .. } => "ERR_INVALID_PROOF",
            Self::Hypercore { .. } => "ERR_HYPERCORE",
            Self::Host(_) => "ERR_HOST",
            Self::Timeout { .. } => "ERR_TIMEOUT",
            Self::Peer { violation, .. } => violation.code(),
        }
    }

    pub(crate) fn hypercore(key: &[u8; 32], source: hypercore::HypercoreError) -> Self {
        Self::Hypercore { key: *key, source }
    }

    /// An I/O error of the connection; one that carries a [`PeerViolation`] becomes
    /// [`ReplicateError::Peer`].
    pub(crate) fn io(phase: Phase, source: impl Into<std::io::Error>) -> Self {
        let source = source.into();
        if let Some(violation) = PeerViolation::from_io(&source) {
            return Self::Peer {
                phase,
                violation: violation.clone(),
            };
        }
        Self::Io { phase, source }
    }

    pub(crate) fn peer(phase: Phase, violation: PeerViolation) -> Self {
        Self::Peer { phase, violation }
    }
}
