//! The replication error type.

use multifeed_meta::MetaError;

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
        phase: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A proof from the peer did not verify: the peer is buggy or lying.
    #[error("invalid proof from the peer for feed {key}: {reason}")]
    InvalidProof {
        /// Hex key of the feed.
        key: String,
        /// Why it failed.
        reason: String,
    },
    /// A hypercore operation on our side failed.
    #[error("hypercore error on feed {key}: {source}")]
    Hypercore {
        /// Hex key of the feed.
        key: String,
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
        phase: &'static str,
    },
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
        }
    }

    pub(crate) fn hypercore(key: &[u8; 32], source: hypercore::HypercoreError) -> Self {
        Self::Hypercore {
            key: hex::encode(key),
            source,
        }
    }

    pub(crate) fn io(phase: &'static str, source: impl Into<std::io::Error>) -> Self {
        Self::Io {
            phase,
            source: source.into(),
        }
    }
}
