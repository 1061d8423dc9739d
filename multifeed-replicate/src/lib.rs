//! Replication of many hypercores over one encrypted Hypercore 10 connection.
//!
//! [`replicate`] runs the Noise XX handshake and secret-stream encryption of
//! `hypercore_handshake` over any `AsyncRead + AsyncWrite`, then `hypercore-protocol` with a root
//! channel keyed by the shared exchange key, carrying the multifeed meta exchange
//! ([`multifeed_meta`]) as extension messages, and one channel per agreed feed. Each feed syncs
//! with hypercore proofs (`create_proof` / `verify_and_apply_proof`) and keeps many requests in
//! flight. The feeds come from a [`FeedHost`], which the `multifeed` facade implements.
//!
//! Every decision (what to ask for, what to answer, when a peer broke a rule or a timeout
//! passed, when the replication is done) is made by a sans-IO connection core with no locks,
//! awaits or clock of its own; the async driver carries its inputs and outputs against the
//! protocol, the hypercores and the host, and one adapter is the only code that touches a
//! hypercore. The core is tested deterministically on a simulated link (see the README).
//!
//! The transport is this crate's own: uint24le framing that never stalls on large frames, end of
//! stream reported as an error, batch frames of several channels split before decoding, and a
//! graceful close that flushes before it shuts the write side.
//!
//! Every peer is treated as hostile. Each plaintext frame is checked before `hypercore-protocol`
//! decodes it (channel ids, vector counts, channels held), what a connection queues is bounded in
//! both directions, every wait ends with the connection or a timeout (handshakes, progress, a
//! live keep-alive), and a feed learned from a peer is recorded only once a signed root of it
//! verified. A peer that breaks a rule ends its connection with
//! [`ReplicateError::Peer`] and a [`PeerViolation`]; the bounds are listed in the workspace
//! README ("Reliability"). Panics of the protocol and the cipher are contained with
//! `catch_unwind`, which a build with `panic = "abort"` gives up.
//!
//! ```
//! # async_std::task::block_on(async {
//! use std::sync::Arc;
//! use multifeed_replicate::{replicate, FeedHost, ReplicateConfig};
//! # use multifeed_replicate::{HostError, LocalFeed};
//! # use multifeed_storage::{FeedKey, SharedCore};
//! # struct Empty;
//! # #[async_trait::async_trait]
//! # impl FeedHost for Empty {
//! #     async fn local_feeds(&self) -> Result<Vec<LocalFeed>, HostError> { Ok(vec![]) }
//! #     async fn open_feed(&self, _: &FeedKey) -> Result<Option<SharedCore>, HostError> { Ok(None) }
//! #     async fn add_remote_feed(&self, _: &FeedKey) -> Result<SharedCore, HostError> { Err("none".into()) }
//! #     fn subscribe_new_feeds(&self) -> futures::stream::BoxStream<'static, FeedKey> {
//! #         Box::pin(futures::stream::pending())
//! #     }
//! #     fn subscribe_changes(&self) -> futures::stream::BoxStream<'static, multifeed_replicate::LocalChange> {
//! #         Box::pin(futures::stream::pending())
//! #     }
//! # }
//! let (a, b) = async_std::os::unix::net::UnixStream::pair()?;
//! let (host_a, host_b): (Arc<dyn FeedHost>, Arc<dyn FeedHost>) = (Arc::new(Empty), Arc::new(Empty));
//! let (ra, rb) = futures::join!(
//!     replicate(a, host_a, ReplicateConfig::new(true)),
//!     replicate(b, host_b, ReplicateConfig::new(false)),
//! );
//! assert_eq!(ra?.blocks_received + rb?.blocks_received, 0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

mod adapter;
mod backlog;
mod close;
mod config;
mod driver;
mod error;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod host;
#[cfg(feature = "hostile-peer")]
#[doc(hidden)]
pub mod hostile;
mod proto;
mod transport;

use std::sync::Arc;

pub use config::{
    KeyFilter, ReplicateConfig, ReplicateSummary, ReplicationEvent, StopHandle,
    DEFAULT_ENCRYPTION_KEY,
};
pub use error::{PeerViolation, Phase, ReplicateError};
pub use host::{FeedHost, HostError, LocalChange, LocalFeed};
pub use hypercore_handshake::CipherTrait;
pub use multifeed_meta::{semver, MetaError};

/// Replicates the host's feeds with a peer over `io` (see the [crate docs](crate)).
pub async fn replicate<IO>(
    io: IO,
    host: Arc<dyn FeedHost>,
    config: ReplicateConfig,
) -> Result<ReplicateSummary, ReplicateError>
where
    IO: futures::AsyncRead + futures::AsyncWrite + Send + Unpin + 'static,
{
    let close = close::CloseSignal::default();
    let channel = transport::SecureChannel::new(Box::new(io), config.initiator, close.clone())
        .map_err(|e| ReplicateError::io(crate::Phase::NoiseHandshake, e))?;
    Box::pin(driver::run(Box::new(channel), Some(close), host, config)).await
}

/// An encrypted connection over `io`: the Noise XX handshake and secret-stream encryption of
/// Hypercore 10 on this crate's framing, as [`replicate`] uses, for [`replicate_cipher`] (to
/// set up the connection apart from the replication, or wrap it).
pub fn secure_channel<IO>(io: IO, initiator: bool) -> Result<Box<dyn CipherTrait>, ReplicateError>
where
    IO: futures::AsyncRead + futures::AsyncWrite + Send + Unpin + 'static,
{
    let channel =
        transport::SecureChannel::new(Box::new(io), initiator, close::CloseSignal::default())
            .map_err(|e| ReplicateError::io(crate::Phase::NoiseHandshake, e))?;
    Ok(Box::new(channel))
}

/// Replicates over an already established encrypted connection (the Rust form of handing an
/// existing protocol stream to JS multifeed). Every frame from it is checked as on
/// [`replicate`]'s own connections.
pub async fn replicate_cipher(
    cipher: Box<dyn hypercore_handshake::CipherTrait>,
    host: Arc<dyn FeedHost>,
    config: ReplicateConfig,
) -> Result<ReplicateSummary, ReplicateError> {
    Box::pin(driver::run(cipher, None, host, config)).await
}
